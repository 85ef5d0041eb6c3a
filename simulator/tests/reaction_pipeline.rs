//! The reaction path on the domain's pipeline (engine stream DSL):
//! validation with the pipeline's reasons, the join, dedupe, one-minute
//! windows with grace, late reactions counted once as corrections, and
//! restore from the committed state.

use std::path::Path;
use std::sync::Arc;

use smartmsg_domain::reactions::CampaignInfo;
use smartmsg_domain::Decisions;
use smartmsg_simulator::reaction::{make_path, PathOutput, ReactionPath};
use smartmsg_simulator::scenario::PathKind;
use smartmsg_simulator::world::{reaction_id, ReactionMessage};
use smartmsg_simulator::{PipelinePath, Scenario, SimPopulation};

const T0: u64 = 1_000_000_020_000; // a window start + 20 s
const MIN: u64 = 60_000;

fn pop() -> Arc<SimPopulation> {
    let csv =
        "user_id,x_0,x_1,p_0,p_1\n0,1,2,0.5,0.5\n1,3,4,0.5,0.5\n2,5,6,0.5,0.5\n3,7,8,0.5,0.5\n";
    Arc::new(SimPopulation::read_csv(csv.as_bytes(), Path::new("t.csv")).unwrap())
}

fn path() -> PipelinePath {
    let info = CampaignInfo {
        start_ms: T0 - 60 * MIN,
        end_ms: T0 + 1_000 * MIN,
        creatives: 2,
        batches: 3,
    };
    let mut p = PipelinePath::new("c", info, pop(), MIN, 2 * MIN).unwrap();
    let mut d = Decisions::default();
    d.push(0, 0, 0.5);
    d.push(1, 1, 0.5);
    d.push(2, 0, 0.5);
    p.batch_sent(0, T0 - 1_000, &d);
    p
}

fn msg(user: u32, creative: u16, time_ms: u64) -> Vec<u8> {
    serde_json::to_vec(&ReactionMessage {
        id: reaction_id(0, user),
        campaign: "c".into(),
        batch: 0,
        user,
        creative,
        kind: "clicked".into(),
        time_ms,
    })
    .unwrap()
}

fn feed(p: &mut PipelinePath, offset: u64, payload: &[u8], arrival: u64) -> PathOutput {
    let mut out = PathOutput::default();
    p.process(offset, arrival, payload, &mut out);
    out
}

#[test]
fn invalid_messages_are_dead_lettered_with_the_pipelines_reason() {
    let mut p = path();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0xff, 0xfe], "not JSON"),
        (b"{\"id\":1".to_vec(), "not JSON"),
        (b"[1,2]".to_vec(), "not a JSON object"),
        (
            br#"{"id":1,"campaign":"c","batch":0,"creative":0,"reaction":"clicked","time_ms":1}"#
                .to_vec(),
            "missing field \"user\"",
        ),
        (
            br#"{"campaign":"x","batch":0,"user":0,"creative":0,"reaction":"clicked","time_ms":1}"#
                .to_vec(),
            "unknown campaign \"x\"",
        ),
        (
            br#"{"campaign":"c","batch":0,"user":0,"creative":0,"reaction":"wave","time_ms":1}"#
                .to_vec(),
            "unknown reaction \"wave\"",
        ),
        (msg(0, 0, 5), "outside the campaign"),
        (msg(0, 7, T0), "creative 7; the campaign has 2"),
        (
            br#"{"campaign":"c","batch":5,"user":0,"creative":0,"reaction":"clicked","time_ms":1000000020000}"#
                .to_vec(),
            "batch 5; the campaign has 3",
        ),
        (msg(99, 0, T0), "no profile for user 99"),
        (msg(3, 0, T0), "no profile for user 3"),
    ];
    for (i, (payload, why)) in cases.iter().enumerate() {
        let out = feed(&mut p, i as u64, payload, T0 + 1);
        assert!(out.windows.is_empty(), "{why}");
        assert_eq!(out.dead_letters.len(), 1, "{why}");
        let d = &out.dead_letters[0];
        assert_eq!((d.offset, d.arrival_ms), (i as u64, T0 + 1));
        assert!(d.reason.contains(why), "{}: {}", why, d.reason);
    }
    assert_eq!(p.stats().duplicates, 0);
}

#[test]
fn windows_close_after_grace_and_count_each_reaction_once() {
    let mut p = path();
    assert!(feed(&mut p, 0, &msg(0, 0, T0), T0).is_empty());
    // A repeat is dropped by the pipeline's dedupe store.
    assert!(feed(&mut p, 1, &msg(0, 0, T0), T0 + 5).is_empty());
    // Same window, other user.
    assert!(feed(&mut p, 2, &msg(1, 1, T0 + 30_000), T0 + 30_000).is_empty());
    let start = T0 - T0 % MIN;
    // Stream time reaches the window's end + grace.
    let out = feed(&mut p, 3, &msg(2, 0, start + 3 * MIN), start + 3 * MIN);
    assert_eq!(out.windows.len(), 1);
    let w = &out.windows[0];
    assert_eq!((w.window_start_ms, w.late), (start, 0));
    assert_eq!(w.per_creative, vec![1, 1]);
    let ids: Vec<u64> = w.reactions.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![reaction_id(0, 0), reaction_id(0, 1)]);
    assert_eq!(w.reactions[0].x, vec![1.0, 2.0], "the user's features");
    assert_eq!(p.stats().duplicates, 1);
    // The punctuation closes the last one.
    let mut out = PathOutput::default();
    p.advance(start + 10 * MIN, &mut out);
    assert_eq!(out.windows.len(), 1);
    assert_eq!(out.windows[0].per_creative, vec![1, 0]);
}

#[test]
fn late_reactions_are_counted_once_as_a_correction() {
    let mut p = path();
    let start = T0 - T0 % MIN;
    feed(&mut p, 0, &msg(0, 0, T0), T0);
    let mut out = PathOutput::default();
    p.advance(start + 10 * MIN, &mut out);
    assert_eq!(out.windows.len(), 1);
    // User 1 reacted in the closed window; the reaction arrives now.
    let out = feed(&mut p, 1, &msg(1, 1, T0 + 1_000), start + 10 * MIN);
    assert_eq!(out.windows.len(), 1, "a correction, at once");
    let w = &out.windows[0];
    assert_eq!((w.window_start_ms, w.late), (start, 1));
    assert_eq!(w.per_creative, vec![0, 1]);
    assert_eq!(w.command_id(), format!("rx-{start}-late-1"));
    assert_eq!(p.stats().late, 1);
    // Its repeat is a repeat; another late one is the second correction.
    assert!(feed(&mut p, 2, &msg(1, 1, T0 + 1_000), start + 12 * MIN).is_empty());
    let out = feed(&mut p, 3, &msg(2, 0, T0 + 2_000), start + 12 * MIN);
    assert_eq!(out.windows[0].late, 2);
    assert_eq!(p.stats().late, 2);
}

#[test]
fn restore_rebuilds_the_dedupe_store_and_the_open_windows() {
    let mut p = path();
    let start = T0 - T0 % MIN;
    feed(&mut p, 0, &msg(0, 0, T0), T0);
    let state = p.state();
    // A new process: the batch again, then the committed state; user 1's
    // reaction was in an emitted (committed) window.
    let mut q = path();
    q.restore(Some(&state), &mut [reaction_id(0, 1)].into_iter())
        .unwrap();
    assert!(
        feed(&mut q, 1, &msg(0, 0, T0), T0 + 1).is_empty(),
        "user 0 is in an open window: a repeat"
    );
    assert!(feed(&mut q, 2, &msg(1, 1, T0), T0 + 1).is_empty());
    assert_eq!(
        q.stats().duplicates,
        2,
        "user 1 was counted before the commit"
    );
    assert!(feed(&mut q, 3, &msg(2, 0, T0 + 2), T0 + 2).is_empty());
    let mut out = PathOutput::default();
    q.advance(T0 + 10 * MIN, &mut out);
    assert_eq!(out.windows.len(), 1);
    let w = &out.windows[0];
    assert_eq!(w.window_start_ms, start);
    assert_eq!(
        w.per_creative,
        vec![2, 0],
        "the restored window's count too"
    );
    assert_eq!(w.reactions[0].x, vec![1.0, 2.0]);
    // Stream time came back: an old reaction is late.
    let mut r = path();
    let mut s = path();
    s.advance(T0 + 10 * MIN, &mut PathOutput::default());
    r.restore(Some(&s.state()), &mut std::iter::empty())
        .unwrap();
    let out = feed(&mut r, 0, &msg(0, 0, T0), T0 + 10 * MIN);
    assert_eq!(out.windows[0].late, 1);
    // A broken state, or a counted reaction nobody was sent, is refused.
    assert!(q
        .restore(
            Some(&serde_json::json!({"stream_time_ms": "x"})),
            &mut std::iter::empty()
        )
        .is_err());
    assert!(path()
        .restore(None, &mut [reaction_id(1, 0)].into_iter())
        .is_err());
}

#[test]
fn the_scenario_picks_the_path() {
    let mut s = Scenario::small();
    let p = pop();
    assert_eq!(s.pipeline.kind, PathKind::Dsl);
    assert_eq!(make_path(&s, Arc::clone(&p)).unwrap().name(), "dsl");
    s.pipeline.kind = PathKind::Builtin;
    assert_eq!(make_path(&s, p).unwrap().name(), "built-in");
    let t = Scenario::from_toml("[pipeline]\nkind = \"builtin\"\n", "t").unwrap();
    assert_eq!(t.pipeline.kind, PathKind::Builtin);
    let e = Scenario::from_toml("[pipeline]\nkind = \"kafka\"\n", "t").unwrap_err();
    assert!(e.to_string().contains("kind"), "{e}");
}
