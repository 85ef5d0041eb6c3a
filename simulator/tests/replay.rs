//! `smartmsg replay`: a simulated log replays with every check holding,
//! from the directory and from an exported file; tampered logs are caught.

use std::sync::Arc;

use smartmsg_domain::CampaignEvent;
use smartmsg_embedded::EmbeddedLog;
use smartmsg_engine::{EventCodec, RecordedEvent};
use smartmsg_simulator::portable;
use smartmsg_simulator::replay::{replay, replay_events};
use smartmsg_simulator::{run_policy, FaultPlan, PolicyName, RunOptions, Scenario, SimPopulation};

fn simulate(dir: &std::path::Path) -> smartmsg_simulator::PolicyRun {
    let scenario = Scenario::small();
    let pop = Arc::new(SimPopulation::generate(&scenario).unwrap());
    run_policy(
        &scenario,
        &pop,
        &RunOptions {
            policy: PolicyName::CreativeThompson,
            dir: dir.to_owned(),
            queue: Default::default(),
            faults: FaultPlan::default(),
            progress: None,
        },
    )
    .unwrap()
}

fn events_of(dir: &std::path::Path) -> Vec<RecordedEvent> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(async {
            let log = EmbeddedLog::open(dir.join("log")).unwrap();
            portable::read_all(&log).await.unwrap()
        })
}

#[test]
fn a_simulated_log_replays_to_the_recorded_state() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let run = simulate(&run_dir);
    let r = replay(&run_dir).unwrap();
    assert!(r.violations().is_empty(), "{}", r.render());
    assert_eq!(r.campaigns.len(), 1);
    let c = &r.campaigns[0];
    assert_eq!(c.messages_planned, run.messages_sent);
    assert_eq!(c.reactions, run.responses_realised);
    assert_eq!(c.batches_planned, 6);
    assert_eq!(c.batches_sent, 6);
    assert!(c.snapshot_checked.is_some(), "{}", r.render());
    let (windows, reactions, fed) = c.path_checked.expect("the reaction path was replayed");
    assert!(windows > 0 && fed > 0, "{}", r.render());
    assert_eq!(reactions, run.responses_realised);
    assert!(r.render().contains("completed"));
    // The same from an exported file.
    let file = dir.path().join("log.jsonl");
    portable::export(&run_dir, &file).unwrap();
    let f = replay(&file).unwrap();
    assert!(f.violations().is_empty(), "{}", f.render());
    assert_eq!(f.campaigns[0].state, c.state);
    assert_eq!(f.events, r.events);
}

fn reencode(e: &mut RecordedEvent, ev: &CampaignEvent) {
    e.payload = ev.encode();
}

#[test]
fn tampered_logs_break_the_checks() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    simulate(&run_dir);
    let events = events_of(&run_dir);
    let planned: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == "BatchPlanned")
        .map(|(i, _)| i)
        .collect();
    let first_user =
        match CampaignEvent::decode("BatchPlanned", 2, &events[planned[0]].payload).unwrap() {
            CampaignEvent::BatchPlanned { decisions, .. } => decisions.users[0],
            _ => unreachable!(),
        };
    // A user planned twice.
    let mut t = events.clone();
    let mut ev = CampaignEvent::decode("BatchPlanned", 2, &t[planned[1]].payload).unwrap();
    if let CampaignEvent::BatchPlanned { decisions, .. } = &mut ev {
        decisions.users[0] = first_user;
    }
    reencode(&mut t[planned[1]], &ev);
    let r = replay_events(&t).unwrap();
    let v = r.violations().join("\n");
    assert!(v.contains("users once: user"), "{v}");
    // A batch sent twice (the event repeated at the end of the stream).
    let mut t = events.clone();
    let sent = t.iter().find(|e| e.kind == "BatchSent").unwrap().clone();
    let last = t
        .iter()
        .filter(|e| e.stream == sent.stream)
        .map(|e| e.version)
        .max()
        .unwrap();
    let mut again = sent.clone();
    again.version = last + 1;
    again.position = t.len() as u64;
    t.push(again);
    let v = replay_events(&t).unwrap().violations().join("\n");
    assert!(v.contains("sent twice"), "{v}");
    assert!(v.contains("after the campaign closed"), "{v}");
}

/// Rewrites the `ReactionPathCommitted` event at `i` through `f`.
fn tamper_commit(
    t: &mut [RecordedEvent],
    i: usize,
    f: impl FnOnce(&mut smartmsg_simulator::events::PathCommitted),
) {
    let mut c: smartmsg_simulator::events::PathCommitted =
        smartmsg_simulator::events::decode(&t[i]).unwrap();
    f(&mut c);
    t[i].payload = serde_json::to_vec(&c).unwrap().into();
}

#[test]
fn tampered_reaction_paths_break_the_virtual_time_checks() {
    use smartmsg_simulator::events::{ModelFed, MODEL_FED, PATH_COMMITTED};
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    simulate(&run_dir);
    let events = events_of(&run_dir);
    let commits: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(i, e)| {
            e.kind == PATH_COMMITTED
                && smartmsg_simulator::events::decode::<smartmsg_simulator::events::PathCommitted>(
                    &events[*i],
                )
                .unwrap()
                .windows
                .iter()
                .any(|w| w.reactions.len() >= 2)
        })
        .map(|(i, _)| i)
        .collect();
    assert!(commits.len() >= 2);
    let replayed = |t: &[RecordedEvent]| replay_events(t).unwrap().violations().join("\n");
    assert_eq!(replayed(&events), "");

    // A reaction moved out of its window (by its timestamp).
    let mut t = events.clone();
    tamper_commit(&mut t, commits[0], |c| {
        let w = c
            .windows
            .iter_mut()
            .find(|w| !w.reactions.is_empty())
            .unwrap();
        w.reactions[0].time_ms = w.window_start_ms + 60_000;
    });
    let v = replayed(&t);
    assert!(v.contains("is outside its window"), "{v}");

    // A reaction counted twice (copied into a later commit).
    let mut t = events.clone();
    let first: smartmsg_simulator::events::PathCommitted =
        smartmsg_simulator::events::decode(&t[commits[0]]).unwrap();
    let r = first
        .windows
        .iter()
        .find(|w| !w.reactions.is_empty())
        .unwrap()
        .reactions[0]
        .clone();
    tamper_commit(&mut t, commits[1], |c| {
        let w = c
            .windows
            .iter_mut()
            .find(|w| !w.reactions.is_empty())
            .unwrap();
        w.reactions[0].id = r.id;
    });
    assert!(
        replayed(&t).contains("exactly once: reaction"),
        "{}",
        replayed(&t)
    );

    // A reaction to a creative the user never got, with the counts to match.
    let mut t = events.clone();
    tamper_commit(&mut t, commits[0], |c| {
        let w = c
            .windows
            .iter_mut()
            .find(|w| !w.reactions.is_empty())
            .unwrap();
        let old = w.reactions[0].creative as usize;
        let new = (old + 1) % w.per_creative.len();
        w.reactions[0].creative = new as u16;
        w.per_creative[old] -= 1;
        w.per_creative[new] += 1;
    });
    let v = replayed(&t);
    assert!(v.contains("joined with the plan"), "{v}");

    // Counts that disagree with the reactions.
    let mut t = events.clone();
    tamper_commit(&mut t, commits[0], |c| {
        c.windows[0].per_creative[0] += 1;
    });
    assert!(
        replayed(&t).contains("its reactions give"),
        "{}",
        replayed(&t)
    );

    // Model feedback that forgets a reacting user.
    let mut t = events.clone();
    let fed = t
        .iter()
        .position(|e| {
            e.kind == MODEL_FED
                && !smartmsg_simulator::events::decode::<ModelFed>(e)
                    .unwrap()
                    .reacted
                    .is_empty()
        })
        .unwrap();
    let mut m: ModelFed = smartmsg_simulator::events::decode(&t[fed]).unwrap();
    m.reacted.pop();
    t[fed].payload = serde_json::to_vec(&m).unwrap().into();
    assert!(
        replayed(&t).contains("model feedback: batch"),
        "{}",
        replayed(&t)
    );

    // A window emitted before it closed in virtual time.
    let mut t = events.clone();
    let at = t[commits[0]].timestamp_ms;
    tamper_commit(&mut t, commits[0], |c| {
        c.windows[0].window_start_ms = at - at % 60_000;
    });
    assert!(
        replayed(&t).contains("closed before emitted"),
        "{}",
        replayed(&t)
    );
}
