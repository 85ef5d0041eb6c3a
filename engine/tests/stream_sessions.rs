//! Session windows: examples, a brute-force reference model under
//! proptest (random keys, out-of-order and late records, random gap and
//! grace, both emit strategies, a crash and restore mid-stream), and the
//! exactly-once runner on the in-memory log across reopens.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use bytes::Bytes;
use common::{append_then_close, crash_and_reopen, open_on_log, replay_with_crash, FAR};
use proptest::prelude::*;
use smartmsg_engine::memory::InMemoryLog;
use smartmsg_engine::stream::{
    envelope, Data, EmitStrategy, InMemoryStore, Key, KeyValueStore, LateReason, LateRecord,
    Record, RunnerConfig, SessionWindowedStream, SessionWindows, StateCodec, TestDriver, Topology,
    Window, WindowError, Windowed,
};
use smartmsg_engine::{EventLog, NewEvent};

fn w(start: u64, end: u64) -> Window {
    Window {
        start_ms: start,
        end_ms: end,
    }
}

fn wk(key: &str, start: u64, end: u64) -> Windowed<String> {
    Windowed {
        key: key.to_string(),
        window: w(start, end),
    }
}

/// The input `input` of `t` grouped by key in sessions of `gap` and
/// `grace`, emitted on `emit`, with late records sent to "late".
fn sessions_of<K: Key, V: Data + StateCodec>(
    t: &Topology,
    input: &str,
    gap: u64,
    grace: u64,
    emit: EmitStrategy,
) -> SessionWindowedStream<K, V> {
    t.stream::<K, V>(input)
        .group_by_key()
        .windowed_by_session(
            SessionWindows::with_inactivity_gap(gap)
                .unwrap()
                .grace(grace),
        )
        .emit(emit)
        .late_records_to("late")
}

fn counts(gap: u64, grace: u64, emit: EmitStrategy) -> Topology {
    let t = Topology::new();
    sessions_of::<String, u32>(&t, "clicks", gap, grace, emit)
        .count("sessions")
        .to("out");
    t
}

#[test]
fn bad_gap_is_a_typed_error() {
    assert_eq!(
        SessionWindows::with_inactivity_gap(0),
        Err(WindowError::ZeroGap)
    );
    let s = SessionWindows::with_inactivity_gap(5).unwrap().grace(2);
    assert_eq!((s.gap_ms(), s.grace_ms()), (5, 2));
    // A session [10, 20] is the window [10, 21) and closes at 21 + 5 + 2.
    assert_eq!(s.window(10, 20), w(10, 21));
    assert_eq!(s.close_ms(20), 28);
    assert_eq!(s.close_ms(u64::MAX), u64::MAX);
}

#[test]
fn on_update_merges_sessions_and_retracts_the_replaced_ones() {
    // Grace 10: [10,12] stays open (until 28) when stream time is 20.
    let mut d = TestDriver::new(counts(5, 10, EmitStrategy::OnUpdate)).unwrap();
    let u = || "u".to_string();
    d.pipe("clicks", u(), 0u32, 10).unwrap();
    d.pipe("clicks", u(), 0u32, 12).unwrap(); // extends [10,10] to [10,12]
    d.pipe("clicks", u(), 0u32, 11).unwrap(); // inside: updated in place
    d.pipe("clicks", u(), 0u32, 20).unwrap(); // 8 after 12: a new session
    d.pipe("clicks", u(), 0u32, 16).unwrap(); // within 5 of both: merges them
    let out = d
        .read_key_values::<Windowed<String>, Option<u64>>("out")
        .unwrap();
    assert_eq!(
        out,
        vec![
            (wk("u", 10, 11), Some(1)),
            (wk("u", 10, 11), None),
            (wk("u", 10, 13), Some(2)),
            (wk("u", 10, 13), Some(3)),
            (wk("u", 20, 21), Some(1)),
            (wk("u", 10, 13), None),
            (wk("u", 20, 21), None),
            (wk("u", 10, 21), Some(5)),
        ]
    );
    assert_eq!(
        d.session_entries::<String, u64>("sessions").unwrap(),
        vec![(wk("u", 10, 21), 5)]
    );
    // Materialised with deletes, the output is the table of sessions.
    let t = Topology::new();
    t.stream::<Windowed<String>, Option<u64>>("s")
        .to_table_with_deletes("current");
    let mut table = TestDriver::new(t).unwrap();
    for (k, v) in out {
        table.pipe("s", k, v, 0).unwrap();
    }
    assert_eq!(
        table
            .table_entries::<Windowed<String>, u64>("current")
            .unwrap(),
        vec![(wk("u", 10, 21), 5)]
    );
}

#[test]
fn on_window_close_emits_each_final_session_once_and_late_records_go_out() {
    let mut d = TestDriver::new(counts(5, 3, EmitStrategy::OnWindowClose)).unwrap();
    let k = |s: &str| s.to_string();
    d.pipe("clicks", k("a"), 0u32, 10).unwrap();
    d.pipe("clicks", k("b"), 0u32, 11).unwrap();
    d.pipe("clicks", k("a"), 0u32, 14).unwrap();
    // a: [10,14] closes at 15 + 5 + 3 = 23; b: [11,11] at 20.
    d.advance_time(19).unwrap();
    assert!(d
        .read_output::<Windowed<String>, Option<u64>>("out")
        .unwrap()
        .is_empty());
    d.advance_time(20).unwrap();
    assert_eq!(
        d.read_output::<Windowed<String>, Option<u64>>("out")
            .unwrap(),
        vec![Record::new(wk("b", 11, 12), Some(1), 11)]
    );
    // Out of order, stream time 20: a record at 13 joins a's open session.
    // One for b at 11 would join b's closed session: b's session is final
    // and gone, and 11 + 5 + 3 < 20, so it is late.
    d.pipe("clicks", k("a"), 0u32, 13).unwrap();
    d.pipe("clicks", k("b"), 7u32, 11).unwrap();
    let late = d.read_output::<String, LateRecord<u32>>("late").unwrap();
    assert_eq!(late.len(), 1);
    assert_eq!((late[0].key.as_str(), late[0].value.value), ("b", 7));
    assert_eq!(
        late[0].value.reason,
        LateReason::WindowClosed {
            window: w(11, 12),
            closed_at_ms: 20,
            stream_time_ms: 20
        }
    );
    assert_eq!(d.metrics().late_records, 1);
    // One at 12 is on time for a session of its own (12 + 5 + 3 = 20): it
    // starts a new one next to the closed session, which is never merged
    // again.
    d.pipe("clicks", k("b"), 0u32, 12).unwrap();
    d.advance_time(23).unwrap();
    assert_eq!(
        d.read_key_values::<Windowed<String>, Option<u64>>("out")
            .unwrap(),
        vec![(wk("b", 12, 13), Some(1)), (wk("a", 10, 15), Some(3))]
    );
    assert!(d
        .session_entries::<String, u64>("sessions")
        .unwrap()
        .is_empty());
}

#[test]
fn aggregate_with_merger_and_reduce() {
    let t = Topology::new();
    let g = t.stream::<u8, u64>("in").group_by_key();
    // Grace 100: nothing closes before the end.
    let s = SessionWindows::with_inactivity_gap(10).unwrap().grace(100);
    g.windowed_by_session(s)
        .emit(EmitStrategy::OnWindowClose)
        .aggregate(
            "spans",
            || (u64::MAX, 0u64),
            |_, v, a: &mut (u64, u64)| *a = (a.0.min(v), a.1.max(v)),
            |_, into, other| *into = (into.0.min(other.0), into.1.max(other.1)),
        )
        .to("spans");
    g.windowed_by_session(s)
        .emit(EmitStrategy::OnWindowClose)
        .reduce("sums", |a, b| *a += b)
        .to("sums");
    let mut d = TestDriver::new(t).unwrap();
    for (ts, v) in [(0u64, 5u64), (30, 7), (15, 1), (100, 2)] {
        d.pipe("in", 1u8, v, ts).unwrap();
    }
    d.advance_time(1_000).unwrap();
    let spans = d
        .read_key_values::<Windowed<u8>, Option<(u64, u64)>>("spans")
        .unwrap();
    // 0, 30, then 15 (more than 10 from both): three sessions, then 100.
    let got: Vec<(Window, (u64, u64))> = spans
        .into_iter()
        .map(|(k, v)| (k.window, v.unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            (w(0, 1), (5, 5)),
            (w(15, 16), (1, 1)),
            (w(30, 31), (7, 7)),
            (w(100, 101), (2, 2))
        ]
    );
    // With a bridging record the reducer merges.
    let t = Topology::new();
    t.stream::<u8, u64>("in")
        .group_by_key()
        .windowed_by_session(s)
        .emit(EmitStrategy::OnWindowClose)
        .reduce("sums", |a, b| *a += b)
        .to("sums");
    let mut d = TestDriver::new(t).unwrap();
    for (ts, v) in [(0u64, 5u64), (20, 7), (10, 1)] {
        d.pipe("in", 1u8, v, ts).unwrap();
    }
    d.advance_time(1_000).unwrap();
    assert_eq!(
        d.read_key_values::<Windowed<u8>, Option<u64>>("sums")
            .unwrap(),
        vec![(
            Windowed {
                key: 1,
                window: w(0, 21)
            },
            Some(13)
        )]
    );
}

#[test]
fn sessions_are_written_behind_and_deleted_when_they_close() {
    let mut d = TestDriver::new(counts(5, 0, EmitStrategy::OnWindowClose)).unwrap();
    d.pipe("clicks", "a".to_string(), 0u32, 10).unwrap();
    d.pipe("clicks", "b".to_string(), 0u32, 10).unwrap();
    d.commit().unwrap();
    assert_eq!(d.store().len("sessions"), 2);
    d.pipe("clicks", "a".to_string(), 0u32, 12).unwrap(); // a grows: re-keyed
    d.commit().unwrap();
    assert_eq!(d.store().len("sessions"), 2);
    // Layout: end, start (big-endian), then the key.
    let key = [&12u64.to_be_bytes()[..], &10u64.to_be_bytes()[..], b"a"].concat();
    assert_eq!(
        d.store().get("sessions", &key).unwrap(),
        Some(2u64.to_bytes())
    );
    d.advance_time(17).unwrap(); // b [10,10] closes at 16
    d.commit().unwrap();
    assert_eq!(d.store().len("sessions"), 1);
    d.advance_time(18).unwrap();
    d.commit().unwrap();
    assert_eq!(d.store().len("sessions"), 0);
    assert_eq!(
        d.read_key_values::<Windowed<String>, Option<u64>>("out")
            .unwrap(),
        vec![(wk("b", 10, 11), Some(1)), (wk("a", 10, 13), Some(2))]
    );
}

// ---------------------------------------------------------------------------
// The reference model.

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// A record of `key` at `ts` (its value is its index among records).
    Rec { key: u8, ts: u64 },
    /// Stream time moves to this.
    Advance(u64),
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        8 => (0u8..3, 0u64..300).prop_map(|(key, ts)| Ev::Rec { key, ts }),
        1 => (0u64..330).prop_map(Ev::Advance),
    ]
}

/// An output: the step (event index) that produced it, key, window start,
/// window end (exclusive), value, timestamp.
type Out = (usize, u8, u64, u64, Option<Vec<u8>>, u64);
/// A late record: step, key, record id, its reason's fields.
type Late = (usize, u8, u8, Window, u64, u64);

#[derive(Debug, Clone)]
struct Sess {
    key: u8,
    start: u64,
    end: u64,
    ids: Vec<u8>,
    closed: bool,
}

/// Every session ever formed, scanned by brute force at each event.
struct Model {
    gap: u64,
    grace: u64,
    emit: EmitStrategy,
    st: u64,
    sessions: Vec<Sess>,
    out: Vec<Out>,
    late: Vec<Late>,
}

impl Model {
    fn new(gap: u64, grace: u64, emit: EmitStrategy) -> Self {
        Self {
            gap,
            grace,
            emit,
            st: 0,
            sessions: Vec::new(),
            out: Vec::new(),
            late: Vec::new(),
        }
    }

    /// Stream time at which a session ending at `end` is closed.
    fn closes(&self, end: u64) -> u64 {
        end + 1 + self.gap + self.grace
    }

    fn advance(&mut self, step: usize, to: u64) {
        if to <= self.st {
            return;
        }
        self.st = to;
        let mut newly: Vec<Sess> = Vec::new();
        for i in 0..self.sessions.len() {
            let s = &self.sessions[i];
            if !s.closed && self.closes(s.end) <= self.st {
                self.sessions[i].closed = true;
                newly.push(self.sessions[i].clone());
            }
        }
        newly.sort_by_key(|s| (s.end, s.key, s.start));
        if self.emit == EmitStrategy::OnWindowClose {
            for s in newly {
                self.out
                    .push((step, s.key, s.start, s.end + 1, Some(s.ids), s.end));
            }
        }
    }

    fn record(&mut self, step: usize, key: u8, id: u8, ts: u64) {
        self.advance(step, ts);
        let touching: Vec<usize> = (0..self.sessions.len())
            .filter(|&i| {
                let s = &self.sessions[i];
                !s.closed && s.key == key && s.start <= ts + self.gap && ts <= s.end + self.gap
            })
            .collect();
        if touching.is_empty() && self.closes(ts) <= self.st {
            let window = w(ts, ts + 1);
            self.late
                .push((step, key, id, window, self.closes(ts), self.st));
            return;
        }
        let mut merged = Sess {
            key,
            start: ts,
            end: ts,
            ids: vec![id],
            closed: false,
        };
        for &i in &touching {
            let s = &self.sessions[i];
            merged.start = merged.start.min(s.start);
            merged.end = merged.end.max(s.end);
            merged.ids.extend(&s.ids);
        }
        merged.ids.sort();
        let mut replaced: Vec<Sess> = touching.iter().map(|&i| self.sessions[i].clone()).collect();
        replaced.sort_by_key(|s| s.start);
        for i in touching.into_iter().rev() {
            self.sessions.remove(i);
        }
        if self.emit == EmitStrategy::OnUpdate {
            for s in replaced {
                if (s.start, s.end) != (merged.start, merged.end) {
                    self.out.push((step, key, s.start, s.end + 1, None, s.end));
                }
            }
            self.out.push((
                step,
                key,
                merged.start,
                merged.end + 1,
                Some(merged.ids.clone()),
                merged.end,
            ));
        }
        self.sessions.push(merged);
    }
}

fn model(events: &[Ev], gap: u64, grace: u64, emit: EmitStrategy) -> (Vec<Out>, Vec<Late>) {
    let mut m = Model::new(gap, grace, emit);
    let mut id = 0u8;
    for (step, e) in events.iter().enumerate() {
        match *e {
            Ev::Rec { key, ts } => {
                m.record(step, key, id, ts);
                id += 1;
            }
            Ev::Advance(to) => m.advance(step, to),
        }
    }
    m.advance(events.len(), FAR);
    (m.out, m.late)
}

/// Sessions of the records' ids (sorted), with late records sent out.
fn id_sessions(gap: u64, grace: u64, emit: EmitStrategy) -> Topology {
    let t = Topology::new();
    sessions_of::<u8, u8>(&t, "in", gap, grace, emit)
        .aggregate(
            "sessions",
            Vec::new,
            |_, id, ids: &mut Vec<u8>| {
                ids.push(id);
                ids.sort();
            },
            |_, into, other| {
                into.extend(other);
                into.sort();
            },
        )
        .to("out");
    t
}

fn collect(d: &mut TestDriver, step: usize, out: &mut Vec<Out>, late: &mut Vec<Late>) {
    for r in d
        .read_output::<Windowed<u8>, Option<Vec<u8>>>("out")
        .unwrap()
    {
        let Windowed { key, window } = r.key;
        out.push((
            step,
            key,
            window.start_ms,
            window.end_ms,
            r.value,
            r.timestamp_ms,
        ));
    }
    for r in d.read_output::<u8, LateRecord<u8>>("late").unwrap() {
        let LateReason::WindowClosed {
            window,
            closed_at_ms,
            stream_time_ms,
        } = r.value.reason
        else {
            panic!("unexpected late reason {:?}", r.value.reason);
        };
        late.push((
            step,
            r.key,
            r.value.value,
            window,
            closed_at_ms,
            stream_time_ms,
        ));
    }
}

fn apply(d: &mut TestDriver, e: Ev, id: &mut u8) {
    match e {
        Ev::Rec { key, ts } => {
            d.pipe("in", key, *id, ts).unwrap();
            *id += 1;
        }
        Ev::Advance(to) => d.advance_time(to).unwrap(),
    }
}

/// Runs `events`, committing before event `commit_at`, then processing
/// `lost` more events and crashing (their effects and outputs are lost),
/// restoring from the store and going on from `commit_at`.
fn run(
    events: &[Ev],
    top: impl Fn() -> Topology,
    commit_at: usize,
    lost: usize,
) -> (Vec<Out>, Vec<Late>) {
    let (mut out, mut late) = (Vec::new(), Vec::new());
    let mut d = replay_with_crash(events, top, commit_at, lost, apply, |d, step| {
        collect(d, step, &mut out, &mut late)
    });
    d.advance_time(FAR).unwrap();
    collect(&mut d, events.len(), &mut out, &mut late);
    (out, late)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Both emit strategies, random gap and grace, out-of-order and late
    /// records, and a crash mid-stream: exactly the model's outputs, at
    /// the same steps.
    #[test]
    fn sessions_match_the_reference_model(
        events in proptest::collection::vec(ev(), 0..100),
        gap in 1u64..25,
        grace in 0u64..25,
        commit_at in 0usize..100,
        lost in 0usize..10,
    ) {
        for emit in [EmitStrategy::OnUpdate, EmitStrategy::OnWindowClose] {
            let (want_out, want_late) = model(&events, gap, grace, emit);
            let (out, late) = run(&events, || id_sessions(gap, grace, emit), commit_at, lost);
            prop_assert_eq!(&out, &want_out, "emit {:?}", emit);
            prop_assert_eq!(&late, &want_late, "emit {:?}", emit);
            if emit == EmitStrategy::OnUpdate {
                // Applied as a table, the updates hold every session.
                let mut table = BTreeMap::new();
                for (_, k, s, e, v, _) in &out {
                    match v {
                        Some(v) => { table.insert((*k, *s, *e), v.clone()); }
                        None => { prop_assert!(table.remove(&(*k, *s, *e)).is_some()); }
                    }
                }
                let (finals, _) = model(&events, gap, grace, EmitStrategy::OnWindowClose);
                let finals: BTreeMap<_, _> = finals
                    .into_iter()
                    .map(|(_, k, s, e, v, _)| ((k, s, e), v.unwrap()))
                    .collect();
                prop_assert_eq!(table, finals);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The runner on the in-memory log.

#[tokio::test]
async fn runner_is_exactly_once_across_reopens() {
    let (gap, grace) = (10, 5);
    // Records (key, ts), out of order, with two late ones (key 2 at 12
    // after stream time 30, key 1 at 3 after 40), then a punctuation that
    // closes everything.
    let records: Vec<(u8, u64)> = vec![
        (1, 0),
        (2, 4),
        (1, 8),
        (1, 30),
        (2, 12),
        (1, 19),
        (2, 40),
        (1, 3),
        (2, 55),
        (1, 60),
        (2, 47),
        (1, 75),
    ];
    let log = Arc::new(InMemoryLog::new());
    let events: Vec<NewEvent> = records
        .iter()
        .enumerate()
        .map(|(i, &(k, ts))| {
            let payload = envelope::encode(&k.to_bytes(), &(i as u8).to_bytes());
            NewEvent::new("in", 1, ts, payload)
        })
        .collect();
    append_then_close(&log, events).await;

    // What the TestDriver gives for the same input, uninterrupted.
    let mut d = TestDriver::new(id_sessions(gap, grace, EmitStrategy::OnUpdate)).unwrap();
    for (i, &(k, ts)) in records.iter().enumerate() {
        d.pipe("in", k, i as u8, ts).unwrap();
    }
    d.advance_time(FAR).unwrap();
    let want: Vec<(Windowed<u8>, Option<Vec<u8>>)> = d.read_key_values("out").unwrap();
    let want_late = d.read_output::<u8, LateRecord<u8>>("late").unwrap();
    assert_eq!(want_late.len(), 2);
    assert!(
        want.iter().any(|(_, v)| v.is_none()),
        "growth retracts: {want:?}"
    );

    let store: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
    let fail = Arc::new(AtomicUsize::new(0));
    let open = || {
        open_on_log(
            id_sessions(gap, grace, EmitStrategy::OnUpdate),
            &store,
            &log,
            &fail,
            RunnerConfig::new("sessions").with_batch(3),
        )
    };
    // Crashes at every step (the records and outputs of the log make about
    // 12 steps).
    let mut r = crash_and_reopen(open, &fail).await;
    assert_eq!(r.run_until_idle().await.unwrap().records, 0);
    assert!(r
        .task()
        .session_entries::<u8, Vec<u8>>("sessions")
        .unwrap()
        .is_empty());

    let all = log.read_all(0, 1_000).await.unwrap();
    let decode = |kind: &str| -> Vec<(Bytes, Bytes)> {
        all.iter()
            .filter(|e| e.kind == kind)
            .map(|e| envelope::decode(&e.payload).unwrap())
            .collect()
    };
    let got: Vec<(Windowed<u8>, Option<Vec<u8>>)> = decode("out")
        .into_iter()
        .map(|(k, v)| {
            (
                Windowed::<u8>::decode(&k).unwrap(),
                Option::<Vec<u8>>::decode(&v).unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want, "every output exactly once, in order");
    let late: Vec<(u8, LateRecord<u8>)> = decode("late")
        .into_iter()
        .map(|(k, v)| (u8::decode(&k).unwrap(), LateRecord::decode(&v).unwrap()))
        .collect();
    let want_late: Vec<(u8, LateRecord<u8>)> =
        want_late.into_iter().map(|r| (r.key, r.value)).collect();
    assert_eq!(late, want_late);
}
