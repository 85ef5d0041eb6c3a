//! `smartmsg replay`: a simulated log replays with every check holding,
//! from the directory and from an exported file; tampered logs are caught.

use std::sync::Arc;

use smartmsg_domain::CampaignEvent;
use smartmsg_embedded::EmbeddedLog;
use smartmsg_engine::{EventCodec, RecordedEvent};
use smartmsg_simulator::portable;
use smartmsg_simulator::replay::{replay, replay_events};
use smartmsg_simulator::{run_policy, PolicyName, RunOptions, Scenario, SimPopulation};

fn simulate(dir: &std::path::Path) -> smartmsg_simulator::PolicyRun {
    let scenario = Scenario::small();
    let pop = Arc::new(SimPopulation::generate(&scenario).unwrap());
    run_policy(
        &scenario,
        &pop,
        &RunOptions::new(PolicyName::CreativeThompson, dir.to_owned()),
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
    let (windows, records, fed) = c.path_checked.expect("the reaction pipeline was replayed");
    assert!(windows > 0 && fed > 0, "{}", r.render());
    // Every reaction, every announced user's profile, the ticks.
    assert!(
        records > run.responses_realised + run.messages_sent,
        "{}",
        r.render()
    );
    assert!(r.render().contains("completed"));
    // The same from an exported file.
    let file = dir.path().join("log.jsonl");
    portable::export(&run_dir, &file).unwrap();
    let f = replay(&file).unwrap();
    assert!(f.violations().is_empty(), "{}", f.render());
    assert_eq!(f.campaigns[0].state, c.state);
    assert_eq!(f.events, r.events);
    // Every kind the run wrote is in the one list of kinds (which the
    // exporter reads): a new kind must be added there.
    let unlisted: std::collections::BTreeSet<String> = events_of(&run_dir)
        .into_iter()
        .filter(|e| smartmsg_service::kinds::payload_of(&e.kind).is_none())
        .map(|e| e.kind)
        .collect();
    assert!(
        unlisted.is_empty(),
        "kinds missing from smartmsg_service::kinds::EVENT_KINDS: {unlisted:?}"
    );
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
    let mut t = events;
    let sent = t.iter().find(|e| e.kind == "BatchSent").unwrap().clone();
    let last = t
        .iter()
        .filter(|e| e.stream == sent.stream)
        .map(|e| e.version)
        .max()
        .unwrap();
    let mut again = sent;
    again.version = last + 1;
    again.position = t.len() as u64;
    t.push(again);
    let v = replay_events(&t).unwrap().violations().join("\n");
    assert!(v.contains("sent twice"), "{v}");
    assert!(v.contains("after the campaign closed"), "{v}");
}

#[test]
fn tampered_reaction_pipelines_break_the_checks() {
    use smartmsg_simulator::events::{ModelFed, MODEL_FED};
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    simulate(&run_dir);
    let events = events_of(&run_dir);
    let replayed = |t: &[RecordedEvent]| replay_events(t).unwrap().violations().join("\n");
    assert_eq!(replayed(&events), "");
    let find = |pred: &dyn Fn(&RecordedEvent) -> bool| events.iter().position(pred).unwrap();

    // A reaction in the pipeline's input that the outputs do not reflect
    // (its time moved by an hour: another window).
    let mut t = events.clone();
    let i = find(&|e| {
        e.stream.as_str().starts_with("pipeline-")
            && e.kind == "Reaction"
            && std::str::from_utf8(&e.payload)
                .is_ok_and(|s| s.contains("\"clicked\"") || s.contains("\"replied\""))
    });
    let text = String::from_utf8(t[i].payload.to_vec()).unwrap();
    let at = text.find("\"time_ms\":").unwrap() + 10;
    let end = at + text[at..].find(|c: char| !c.is_ascii_digit()).unwrap();
    let time: u64 = text[at..end].parse().unwrap();
    let moved = format!("{}{}{}", &text[..at], time + 3_600_000, &text[end..]);
    t[i].payload = moved.into_bytes().into();
    let v = replayed(&t);
    assert!(v.contains("same outputs"), "{v}");

    // A window's output altered after the fact.
    let mut t = events.clone();
    let i = find(&|e| e.kind == "reaction-windows");
    t[i].timestamp_ms += 1;
    let v = replayed(&t);
    assert!(v.contains("same outputs: reaction-windows record"), "{v}");

    // A first reaction lost from the outputs.
    let mut t = events.clone();
    let i = find(&|e| e.kind == "reaction-user-outcomes");
    t.remove(i);
    let v = replayed(&t);
    assert!(
        v.contains("same outputs: reaction-user-outcomes holds"),
        "{v}"
    );

    // Model feedback that forgets a reacting user.
    let mut t = events.clone();
    let fed = t
        .iter()
        .position(|e| {
            e.kind == MODEL_FED
                && !serde_json::from_slice::<ModelFed>(&e.payload)
                    .unwrap()
                    .reacted
                    .is_empty()
        })
        .unwrap();
    let mut m: ModelFed = serde_json::from_slice(&t[fed].payload).unwrap();
    m.reacted.pop();
    t[fed].payload = serde_json::to_vec(&m).unwrap().into();
    assert!(
        replayed(&t).contains("model feedback: batch"),
        "{}",
        replayed(&t)
    );

    // The campaign records reactions the pipeline never closed a window on.
    let mut t = events.clone();
    let i = find(&|e| e.kind == "ReactionsRecorded");
    let mut ev = CampaignEvent::decode("ReactionsRecorded", t[i].schema, &t[i].payload).unwrap();
    if let CampaignEvent::ReactionsRecorded { command, .. } = &mut ev {
        command.id = "made-up".into();
    }
    reencode(&mut t[i], &ev);
    let v = replayed(&t);
    assert!(v.contains("do not come from the pipeline"), "{v}");
}
