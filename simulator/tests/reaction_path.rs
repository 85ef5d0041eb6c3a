//! The built-in reaction path: validation with reasons, the join, dedupe,
//! one-minute windows with grace, late reactions counted once, restore.

use std::path::Path;
use std::sync::Arc;

use smartmsg_domain::Decisions;
use smartmsg_simulator::reaction::{BuiltinPath, PathOutput, ReactionPath};
use smartmsg_simulator::world::ReactionMessage;
use smartmsg_simulator::SimPopulation;

const T0: u64 = 1_000_000_020_000; // a window start + 20 s
const MIN: u64 = 60_000;

fn pop() -> Arc<SimPopulation> {
    let csv =
        "user_id,x_0,x_1,p_0,p_1\n0,1,2,0.5,0.5\n1,3,4,0.5,0.5\n2,5,6,0.5,0.5\n3,7,8,0.5,0.5\n";
    Arc::new(SimPopulation::read_csv(csv.as_bytes(), Path::new("t.csv")).unwrap())
}

fn path() -> BuiltinPath {
    let mut p = BuiltinPath::new("c", pop(), MIN, 2 * MIN);
    let mut d = Decisions::default();
    d.push(0, 0, 0.5);
    d.push(1, 1, 0.5);
    d.push(2, 0, 0.5);
    p.batch_sent(0, T0 - 1_000, &d);
    p
}

fn msg(id: u64, user: u32, creative: u16, time_ms: u64) -> Vec<u8> {
    serde_json::to_vec(&ReactionMessage {
        id,
        campaign: "c".into(),
        batch: 0,
        user,
        creative,
        kind: "clicked".into(),
        time_ms,
    })
    .unwrap()
}

fn feed(p: &mut BuiltinPath, offset: u64, payload: &[u8], arrival: u64) -> PathOutput {
    let mut out = PathOutput::default();
    p.process(offset, arrival, payload, &mut out);
    out
}

#[test]
fn invalid_messages_are_dead_lettered_with_a_reason() {
    let mut p = path();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0xff, 0xfe], "not UTF-8"),
        (b"{\"id\":1".to_vec(), "not a valid reaction"),
        (
            br#"{"id":1,"campaign":"c","batch":0,"creative":0,"reaction":"clicked","time_ms":1}"#.to_vec(),
            "missing field `user`",
        ),
        (
            br#"{"id":1,"campaign":"x","batch":0,"user":0,"creative":0,"reaction":"clicked","time_ms":1}"#
                .to_vec(),
            "is not this campaign",
        ),
        (
            br#"{"id":1,"campaign":"c","batch":0,"user":0,"creative":0,"reaction":"wave","time_ms":1}"#
                .to_vec(),
            "unknown reaction type",
        ),
        (
            br#"{"id":1,"campaign":"c","batch":5,"user":0,"creative":0,"reaction":"clicked","time_ms":1}"#
                .to_vec(),
            "batch 5 was not sent",
        ),
        (msg(1, 99, 0, T0), "not a subscriber"),
        (msg(1, 3, 0, T0), "got no message in batch 0"),
        (msg(1, 1, 0, T0), "got creative 1 in batch 0, not creative 0"),
        (msg(1, 0, 0, T0 - 5_000), "precedes its message"),
        (msg(1, 0, 0, T0 + 10_000), "after its arrival"),
    ];
    for (i, (payload, why)) in cases.iter().enumerate() {
        let out = feed(&mut p, i as u64, payload, T0 + 1);
        assert!(out.windows.is_empty());
        assert_eq!(out.dead_letters.len(), 1, "{why}");
        let d = &out.dead_letters[0];
        assert_eq!(d.offset, i as u64);
        assert!(d.reason.contains(why), "{}: {}", why, d.reason);
    }
}

#[test]
fn windows_close_after_grace_and_count_each_reaction_once() {
    let mut p = path();
    assert!(feed(&mut p, 0, &msg(10, 0, 0, T0), T0).is_empty());
    // A repeat is dropped.
    assert!(feed(&mut p, 1, &msg(10, 0, 0, T0), T0 + 5).is_empty());
    // Same window, other user.
    assert!(feed(&mut p, 2, &msg(11, 1, 1, T0 + 30_000), T0 + 30_000).is_empty());
    // Stream time reaches the window's end + grace only with a later event.
    let start = T0 - T0 % MIN;
    let out = feed(&mut p, 3, &msg(12, 2, 0, start + 3 * MIN), start + 3 * MIN);
    assert_eq!(out.windows.len(), 1);
    let w = &out.windows[0];
    assert_eq!((w.window_start_ms, w.late), (start, 0));
    assert_eq!(w.per_creative, vec![1, 1]);
    assert_eq!(
        w.reactions[0].x,
        vec![1.0, 2.0],
        "joined with the user's features"
    );
    assert_eq!(w.command_id(), format!("rx-{start}"));
    assert_eq!(p.stats().duplicates, 1);
}

#[test]
fn late_reactions_are_counted_once_as_a_correction() {
    let mut p = path();
    let start = T0 - T0 % MIN;
    feed(&mut p, 0, &msg(10, 0, 0, T0), T0);
    let mut out = PathOutput::default();
    p.advance(start + 10 * MIN, &mut out);
    assert_eq!(out.windows.len(), 1);
    // Reaction 11 happened in the closed window but arrives now.
    let out = feed(&mut p, 1, &msg(11, 1, 1, T0 + 1_000), start + 10 * MIN);
    assert_eq!(out.windows.len(), 1, "emitted as a correction at once");
    let w = &out.windows[0];
    assert_eq!((w.window_start_ms, w.late), (start, 1));
    assert_eq!(w.per_creative, vec![0, 1]);
    assert_eq!(w.command_id(), format!("rx-{start}-late-1"));
    assert_eq!(p.stats().late, 1);
    // Its repeat is still a repeat.
    assert!(feed(&mut p, 2, &msg(11, 1, 1, T0 + 1_000), start + 12 * MIN).is_empty());
}

#[test]
fn restore_brings_back_open_windows_and_the_dedupe_set() {
    let mut p = path();
    feed(&mut p, 0, &msg(10, 0, 0, T0), T0);
    let state = p.state();
    let mut q = path();
    q.restore(Some(&state), &mut [77u64].into_iter()).unwrap();
    assert!(
        feed(&mut q, 1, &msg(10, 0, 0, T0), T0 + 1).is_empty(),
        "10 is open: a repeat"
    );
    assert!(feed(&mut q, 2, &msg(77, 1, 1, T0), T0 + 1).is_empty());
    assert_eq!(q.stats().duplicates, 2, "77 was counted before the commit");
    let mut out = PathOutput::default();
    q.advance(T0 + 10 * MIN, &mut out);
    assert_eq!(out.windows[0].per_creative, vec![1, 0]);
    assert_eq!(out.windows[0].reactions[0].x, vec![1.0, 2.0]);
    assert!(q
        .restore(
            Some(&serde_json::json!({"stream_time_ms": "x"})),
            &mut std::iter::empty()
        )
        .is_err());
}
