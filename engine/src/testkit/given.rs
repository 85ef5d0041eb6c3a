//! Given/when/then tests for aggregates.
//!
//! ```
//! # use smartmsg_engine::testkit::given;
//! # use smartmsg_engine::{Aggregate, DecideCtx, DecodeError, EventCodec};
//! # use bytes::Bytes;
//! # #[derive(Default)] struct Counter(u64);
//! # #[derive(Debug, PartialEq)] struct Added(u64);
//! # #[derive(Debug, thiserror::Error)] #[error("too big")] struct TooBig;
//! # impl EventCodec for Added {
//! #     fn kind(&self) -> &'static str { "Added" }
//! #     fn schema(&self) -> u16 { 1 }
//! #     fn encode(&self) -> Bytes { Bytes::from(self.0.to_string()) }
//! #     fn decode(kind: &str, schema: u16, p: &[u8]) -> Result<Self, DecodeError> {
//! #         std::str::from_utf8(p).ok().and_then(|s| s.parse().ok()).map(Added)
//! #             .ok_or(DecodeError::BadPayload { kind: kind.into(), schema, reason: "nan".into() })
//! #     }
//! # }
//! # impl Aggregate for Counter {
//! #     type Command = u64; type Event = Added; type Error = TooBig;
//! #     fn decide(&self, n: &u64, _: &DecideCtx) -> Result<Vec<Added>, TooBig> {
//! #         if self.0 + n > 10 { Err(TooBig) } else { Ok(vec![Added(*n)]) }
//! #     }
//! #     fn evolve(&mut self, e: &Added) { self.0 += e.0 }
//! # }
//! let state = given::<Counter>(vec![Added(3)]).when(4).then(vec![Added(4)]);
//! assert_eq!(state.0, 7);
//!
//! given::<Counter>(vec![Added(9)]).when(2).then_error(|e| matches!(e, TooBig));
//! ```
//!
//! Every event, given or produced, is also encoded and decoded with its
//! [`EventCodec`] and compared with the original, so a codec that loses or
//! garbles a field fails the test that first uses that event.
//!
//! On a mismatch the helpers panic (they are test assertions) with a message
//! that lists expected and produced events side by side.

use std::fmt::{self, Debug, Write as _};

use crate::aggregate::{Aggregate, DecideCtx, EventCodec};
use crate::stream_id::StreamId;

/// The stream name [`Given`] puts in its [`DecideCtx`] unless told another.
pub const GIVEN_STREAM: &str = "given-when-then";

/// Starts a test from the aggregate's history: `events` are applied, in
/// order, to the default state. Type the aggregate explicitly:
/// `given::<Account>(vec![...])`.
///
/// # Panics
/// If an event does not survive an encode/decode round trip.
#[track_caller]
pub fn given<A>(events: Vec<A::Event>) -> Given<A>
where
    A: Aggregate,
    A::Event: PartialEq + Debug,
{
    Given::new(events)
}

/// An aggregate built from its history, ready for a command. See the
/// [module docs](self).
pub struct Given<A> {
    state: A,
    version: u64,
    stream: StreamId,
    now_ms: u64,
}

impl<A: Debug> Debug for Given<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Given")
            .field("state", &self.state)
            .field("version", &self.version)
            .field("stream", &self.stream)
            .field("now_ms", &self.now_ms)
            .finish()
    }
}

impl<A> Given<A>
where
    A: Aggregate,
    A::Event: PartialEq + Debug,
{
    /// The aggregate after `events`; see [`given`].
    ///
    /// # Panics
    /// If an event does not survive an encode/decode round trip.
    #[track_caller]
    pub fn new(events: Vec<A::Event>) -> Self {
        let mut state = A::default();
        for (i, e) in events.iter().enumerate() {
            check_round_trip(e, &format!("given event {i}"));
            state.evolve(e);
        }
        Self {
            state,
            version: events.len() as u64,
            stream: default_stream(),
            now_ms: 0,
        }
    }

    /// A new aggregate with no history.
    pub fn nothing() -> Self {
        Self::new(Vec::new())
    }

    /// Decides on `stream` (the [`DecideCtx::stream`]); default
    /// [`GIVEN_STREAM`].
    pub fn on_stream(mut self, stream: StreamId) -> Self {
        self.stream = stream;
        self
    }

    /// Decides at `now_ms` (the [`DecideCtx::now_ms`]); default 0.
    pub fn at(mut self, now_ms: u64) -> Self {
        self.now_ms = now_ms;
        self
    }

    /// The state the history produced.
    pub fn state(&self) -> &A {
        &self.state
    }

    /// The context `decide` will see: the stream, the number of given
    /// events as the version, and the time.
    pub fn ctx(&self) -> DecideCtx {
        DecideCtx {
            stream: self.stream.clone(),
            version: self.version,
            now_ms: self.now_ms,
        }
    }

    /// Decides `command` against the state.
    pub fn when(self, command: A::Command) -> When<A> {
        let result = self.state.decide(&command, &self.ctx());
        When {
            given: self,
            result,
        }
    }
}

/// The outcome of a command, to be checked with [`When::then`],
/// [`When::then_nothing`] or [`When::then_error`].
#[must_use = "a `when` without a `then` checks nothing"]
pub struct When<A: Aggregate> {
    given: Given<A>,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A> Debug for When<A>
where
    A: Aggregate + Debug,
    A::Event: Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("When")
            .field("given", &self.given)
            .field("result", &self.result)
            .finish()
    }
}

impl<A> When<A>
where
    A: Aggregate,
    A::Event: PartialEq + Debug,
{
    /// What `decide` returned.
    pub fn result(&self) -> &Result<Vec<A::Event>, A::Error> {
        &self.result
    }

    /// Asserts that the command produced exactly `expected` (compared with
    /// `PartialEq`, in order) and returns the state after applying them.
    ///
    /// # Panics
    /// If the command was refused, produced other events, or an event does
    /// not survive an encode/decode round trip.
    #[track_caller]
    pub fn then(self, expected: Vec<A::Event>) -> A {
        let produced = match self.result {
            Ok(events) => events,
            Err(e) => panic!(
                "given/when/then: expected {} event(s), but the command was refused: {e:?}\n  expected:\n{}",
                expected.len(),
                list(&expected),
            ),
        };
        for (i, e) in produced.iter().enumerate() {
            check_round_trip(e, &format!("produced event {i}"));
        }
        if produced != expected {
            panic!(
                "given/when/then: the command produced other events than expected\n{}",
                diff(&expected, &produced)
            );
        }
        let mut state = self.given.state;
        for e in &produced {
            state.evolve(e);
        }
        state
    }

    /// Asserts that the command was accepted and produced no events (an
    /// idempotent repeat, a no-op); returns the unchanged state.
    ///
    /// # Panics
    /// If the command was refused or produced events.
    #[track_caller]
    pub fn then_nothing(self) -> A {
        self.then(Vec::new())
    }

    /// Asserts that the command was refused with an error `check` accepts
    /// (e.g. `|e| matches!(e, MyError::NotOpen)`), and returns the error.
    ///
    /// # Panics
    /// If the command produced events, or `check` returns `false`.
    #[track_caller]
    pub fn then_error(self, check: impl FnOnce(&A::Error) -> bool) -> A::Error {
        match self.result {
            Ok(events) => panic!(
                "given/when/then: expected the command to be refused, but it produced {} event(s):\n{}",
                events.len(),
                list(&events)
            ),
            Err(e) => {
                if !check(&e) {
                    panic!("given/when/then: the command was refused with an unexpected error: {e:?} ({e})");
                }
                e
            }
        }
    }
}

fn default_stream() -> StreamId {
    match StreamId::new(GIVEN_STREAM) {
        Ok(s) => s,
        Err(e) => unreachable!("{GIVEN_STREAM:?} is a valid stream id: {e}"),
    }
}

/// Encodes and decodes `event` and panics unless the result equals it.
#[track_caller]
fn check_round_trip<E: EventCodec + PartialEq + Debug>(event: &E, what: &str) {
    let kind = event.kind();
    let schema = event.schema();
    let payload = event.encode();
    match E::decode(kind, schema, &payload) {
        Ok(back) if &back == event => {}
        Ok(back) => panic!(
            "given/when/then: {what} changes in an encode/decode round trip (a codec bug)\n  \
             event:   {event:?}\n  decoded: {back:?}\n  kind {kind:?}, schema {schema}, payload {}",
            show_payload(&payload)
        ),
        Err(e) => panic!(
            "given/when/then: {what} does not decode after encoding (a codec bug)\n  \
             event: {event:?}\n  error: {e}\n  kind {kind:?}, schema {schema}, payload {}",
            show_payload(&payload)
        ),
    }
}

fn show_payload(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!("{payload:02x?}"),
    }
}

fn list<E: Debug>(events: &[E]) -> String {
    if events.is_empty() {
        return "    (none)".to_owned();
    }
    let mut out = String::new();
    for (i, e) in events.iter().enumerate() {
        let _ = writeln!(out, "    [{i}] {e:?}");
    }
    out.pop();
    out
}

/// A side-by-side listing of expected and produced events.
fn diff<E: PartialEq + Debug>(expected: &[E], produced: &[E]) -> String {
    let mut out = format!(
        "  expected {} event(s), produced {}:\n",
        expected.len(),
        produced.len()
    );
    for i in 0..expected.len().max(produced.len()) {
        let _ = match (expected.get(i), produced.get(i)) {
            (Some(x), Some(p)) if x == p => writeln!(out, "    [{i}] ok        {p:?}"),
            (Some(x), Some(p)) => {
                writeln!(out, "    [{i}] expected  {x:?}\n        produced  {p:?}")
            }
            (Some(x), None) => writeln!(out, "    [{i}] missing   {x:?}"),
            (None, Some(p)) => writeln!(out, "    [{i}] extra     {p:?}"),
            (None, None) => Ok(()),
        };
    }
    out.pop();
    out
}

#[cfg(test)]
mod tests {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use bytes::Bytes;

    use super::*;
    use crate::aggregate::DecodeError;
    use crate::repository::fixtures::*;

    fn panic_message(f: impl FnOnce()) -> String {
        let err = catch_unwind(AssertUnwindSafe(f)).expect_err("expected a panic");
        err.downcast_ref::<String>()
            .cloned()
            .or_else(|| err.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default()
    }

    fn opened() -> AccountEvent {
        AccountEvent::Opened {
            owner: "ann".into(),
            at: 1,
        }
    }

    fn deposited(id: &str, amount: u64) -> AccountEvent {
        AccountEvent::Deposited {
            id: id.into(),
            amount,
        }
    }

    #[test]
    fn then_checks_events_and_returns_the_new_state() {
        let state = given::<Account>(vec![opened(), deposited("d1", 10)])
            .when(deposit("d2", 5))
            .then(vec![deposited("d2", 5)]);
        assert_eq!(state.balance, 15);

        let state = Given::<Account>::nothing()
            .at(42)
            .when(open("bob"))
            .then(vec![AccountEvent::Opened {
                owner: "bob".into(),
                at: 42,
            }]);
        assert_eq!(state.opened_at, 42);
    }

    #[test]
    fn the_context_reflects_the_history() {
        let g = given::<Account>(vec![opened(), deposited("d1", 1)])
            .at(7)
            .on_stream(StreamId::new("acc-9").unwrap());
        let ctx = g.ctx();
        assert_eq!(
            (ctx.version, ctx.now_ms, ctx.stream.as_str()),
            (2, 7, "acc-9")
        );
        assert_eq!(g.state().balance, 1);
        assert_eq!(
            Given::<Account>::nothing().ctx().stream.as_str(),
            GIVEN_STREAM
        );
    }

    #[test]
    fn then_nothing_accepts_an_idempotent_repeat() {
        let state = given::<Account>(vec![opened(), deposited("d1", 10)])
            .when(deposit("d1", 10))
            .then_nothing();
        assert_eq!(state.balance, 10);
    }

    #[test]
    fn then_error_checks_the_refusal() {
        let e = given::<Account>(vec![opened()])
            .when(AccountCommand::Withdraw { amount: 3 })
            .then_error(|e| matches!(e, AccountError::Insufficient { requested: 3, .. }));
        assert_eq!(
            e,
            AccountError::Insufficient {
                balance: 0,
                requested: 3
            }
        );
    }

    #[test]
    fn a_mismatch_panics_with_a_diff() {
        let msg = panic_message(|| {
            given::<Account>(vec![opened()])
                .when(AccountCommand::DepositMany {
                    ids_and_amounts: vec![("a".into(), 1), ("b".into(), 2), ("c".into(), 3)],
                })
                .then(vec![deposited("a", 1), deposited("b", 20)]);
        });
        assert!(msg.contains("expected 2 event(s), produced 3"), "{msg}");
        assert!(msg.contains("[0] ok"), "{msg}");
        assert!(
            msg.contains("[1] expected  Deposited { id: \"b\", amount: 20 }"),
            "{msg}"
        );
        assert!(
            msg.contains("produced  Deposited { id: \"b\", amount: 2 }"),
            "{msg}"
        );
        assert!(
            msg.contains("[2] extra     Deposited { id: \"c\", amount: 3 }"),
            "{msg}"
        );

        let msg = panic_message(|| {
            given::<Account>(vec![opened()])
                .when(deposit("a", 1))
                .then(vec![deposited("a", 1), deposited("b", 1)]);
        });
        assert!(msg.contains("[1] missing"), "{msg}");
    }

    #[test]
    fn unexpected_outcomes_panic_readably() {
        let msg = panic_message(|| {
            given::<Account>(vec![])
                .when(deposit("a", 1))
                .then(vec![deposited("a", 1)]);
        });
        assert!(msg.contains("refused: NotOpen"), "{msg}");

        let msg = panic_message(|| {
            given::<Account>(vec![opened()])
                .when(deposit("a", 1))
                .then_error(|_| true);
        });
        assert!(msg.contains("expected the command to be refused"), "{msg}");
        assert!(msg.contains("[0] Deposited"), "{msg}");

        let msg = panic_message(|| {
            given::<Account>(vec![])
                .when(deposit("a", 1))
                .then_error(|e| matches!(e, AccountError::ZeroAmount));
        });
        assert!(msg.contains("unexpected error: NotOpen"), "{msg}");
    }

    /// An aggregate whose codec drops the `note` field.
    #[derive(Default)]
    struct Notes(Vec<String>);

    #[derive(Debug, PartialEq)]
    struct Noted {
        note: String,
        broken: bool,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    struct Never;

    impl EventCodec for Noted {
        fn kind(&self) -> &'static str {
            "Noted"
        }
        fn schema(&self) -> u16 {
            1
        }
        fn encode(&self) -> Bytes {
            if self.broken {
                Bytes::from_static(b"")
            } else {
                Bytes::from(self.note.clone())
            }
        }
        fn decode(kind: &str, schema: u16, payload: &[u8]) -> Result<Self, DecodeError> {
            if payload.is_empty() {
                return Err(DecodeError::BadPayload {
                    kind: kind.into(),
                    schema,
                    reason: "empty".into(),
                });
            }
            Ok(Noted {
                // The bug: upper-cases on the way back.
                note: String::from_utf8_lossy(payload).to_uppercase(),
                broken: false,
            })
        }
    }

    impl Aggregate for Notes {
        type Command = (String, bool);
        type Event = Noted;
        type Error = Never;
        fn decide(&self, c: &(String, bool), _: &DecideCtx) -> Result<Vec<Noted>, Never> {
            Ok(vec![Noted {
                note: c.0.clone(),
                broken: c.1,
            }])
        }
        fn evolve(&mut self, e: &Noted) {
            self.0.push(e.note.clone());
        }
    }

    fn noted(note: &str, broken: bool) -> Noted {
        Noted {
            note: note.into(),
            broken,
        }
    }

    #[test]
    fn codec_bugs_are_caught() {
        // Upper-case notes survive the buggy codec.
        let state = given::<Notes>(vec![noted("A", false)])
            .when(("B".into(), false))
            .then(vec![noted("B", false)]);
        assert_eq!(state.0, vec!["A", "B"]);

        let msg = panic_message(|| {
            given::<Notes>(vec![])
                .when(("lower".into(), false))
                .then(vec![noted("lower", false)]);
        });
        assert!(
            msg.contains("produced event 0 changes in an encode/decode round trip"),
            "{msg}"
        );
        assert!(msg.contains("LOWER"), "{msg}");

        let msg = panic_message(|| {
            let _ = given::<Notes>(vec![noted("ok", false)]);
        });
        assert!(msg.contains("given event 0"), "{msg}");

        let msg = panic_message(|| {
            given::<Notes>(vec![])
                .when(("X".into(), true))
                .then(vec![noted("X", true)]);
        });
        assert!(msg.contains("does not decode after encoding"), "{msg}");
        assert!(msg.contains("empty"), "{msg}");
    }
}
