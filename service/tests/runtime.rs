//! The runtime end to end on the embedded backend under a manual clock:
//! campaigns planned, announced, sent, reacted to, learned from and
//! completed; a reopened runtime resumes exactly; bad input at every port.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rand::SeedableRng;
use smartmsg_domain::synthetic::{Population, ResponseTruth};
use smartmsg_domain::{
    Action, BatchSchedule, BatchSizing, CampaignCommand, CampaignSpec, Candidates, OutgoingBatch,
    PolicySpec, Status,
};
use smartmsg_embedded::EmbeddedConfig;
use smartmsg_engine::{ManualClock, StreamId};
use smartmsg_service::sender::MessageRecord;
use smartmsg_service::{
    embedded_ports, CampaignSetup, Ports, Runtime, RuntimeOptions, SendError, Sender, Submitted,
};

const START: u64 = 1_700_000_000_000;
const HOUR: u64 = 3_600_000;

/// Records every batch it is given; fails the first `fail` sends.
#[derive(Default)]
struct Recording {
    batches: Mutex<Vec<OutgoingBatch>>,
    fail: Mutex<u32>,
}

#[async_trait]
impl Sender for Recording {
    fn name(&self) -> &str {
        "recording"
    }
    async fn send(&self, batch: &OutgoingBatch) -> Result<(), SendError> {
        {
            let mut f = self.fail.lock().unwrap();
            if *f > 0 {
                *f -= 1;
                return Err(SendError::Unavailable {
                    batch: batch.key(),
                    reason: "test failure".into(),
                });
            }
        }
        self.batches.lock().unwrap().push(batch.clone());
        Ok(())
    }
}

fn population() -> Population {
    let truth = ResponseTruth::segmented(2, 3, 0.2, 1.5);
    Population::generate(3_000, truth, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3)).unwrap()
}

fn spec() -> CampaignSpec {
    CampaignSpec {
        channel: "test-channel".into(),
        audience: "pop".into(),
        creatives: vec!["red".into(), "blue".into()],
        budget: 600,
        schedule: BatchSchedule {
            start_ms: START,
            interval_ms: HOUR,
            sizing: BatchSizing::Count(3),
        },
    }
}

fn setup(id: &str, audience: Candidates) -> CampaignSetup {
    let mut s = CampaignSetup::new(
        id,
        spec(),
        audience,
        PolicySpec::Integrated {
            model: {
                let mut v = smartmsg_domain::ModelConfig::default();
                v.propensity_draws = 4;
                v
            },
        },
    );
    s.seed = 11;
    s.reaction_horizon_ms = HOUR;
    s
}

fn ports(dir: &std::path::Path, clock: &ManualClock, sender: Arc<Recording>) -> Ports {
    let c = {
        let mut built = EmbeddedConfig::default();
        built.segment_bytes = 4 << 20;
        built
    };
    embedded_ports(dir, c, Arc::new(clock.clone()), sender).unwrap()
}

/// One test's data directory, population, clock and recording sender.
struct Fixture {
    dir: tempfile::TempDir,
    pop: Population,
    clock: ManualClock,
    sender: Arc<Recording>,
}

impl Fixture {
    /// A fresh directory, the clock at `now_ms`.
    fn new(now_ms: u64) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            pop: population(),
            clock: ManualClock::new(now_ms),
            sender: Arc::new(Recording::default()),
        }
    }

    /// The runtime over the fixture's directory, opened (or reopened).
    async fn open(&self) -> Runtime {
        self.open_with(RuntimeOptions::default()).await
    }

    async fn open_with(&self, options: RuntimeOptions) -> Runtime {
        Runtime::open(
            ports(self.dir.path(), &self.clock, self.sender.clone()),
            options,
        )
        .await
        .unwrap()
    }

    /// Opened, with campaign `c1` over the whole population started.
    async fn started(&self) -> Runtime {
        let mut rt = self.open().await;
        rt.create_campaign(setup("c1", self.pop.candidates.clone()))
            .await
            .unwrap();
        rt.start("c1").await.unwrap();
        rt
    }
}

/// The reaction line of `user` clicking `creative` of batch `batch` of
/// campaign `c1` at `time_ms`.
fn clicked(batch: u32, user: u32, creative: u16, time_ms: u64) -> bytes::Bytes {
    format!(
        r#"{{"campaign":"c1","batch":{batch},"user":{user},"creative":{creative},"reaction":"clicked","time_ms":{time_ms}}}"#
    )
    .into()
}

/// Reactions of the users of `batch` who react (by the true model, the
/// same draw whatever the run), `delay` after the batch was sent.
fn reactions(pop: &Population, b: &OutgoingBatch, sent: u64, delay: u64) -> Vec<bytes::Bytes> {
    b.decisions
        .iter()
        .filter(|(u, c, _)| {
            let p = pop.probability(*u, *c);
            let h = smartmsg_domain::rng::mix(&[99, u64::from(*u)]);
            ((h >> 11) as f64 / (1u64 << 53) as f64) < p
        })
        .map(|(u, c, _)| {
            bytes::Bytes::from(format!(
                r#"{{"campaign":"{}","batch":{},"user":{u},"creative":{c},"reaction":"clicked","time_ms":{}}}"#,
                b.campaign,
                b.batch,
                sent + delay
            ))
        })
        .collect()
}

/// Runs the campaign to completion, optionally dropping and reopening the
/// runtime before each step (`crash_every`). Returns the batches sent, the
/// reactions submitted, and the final view.
async fn run(
    fx: &Fixture,
    reopen: bool,
) -> (Vec<OutgoingBatch>, u64, smartmsg_service::CampaignView) {
    let (pop, clock, sender) = (&fx.pop, &fx.clock, &fx.sender);
    let mut rt = fx.started().await;
    let mut submitted = 0u64;
    let mut fed_reactions = 0usize;
    let times: Vec<u64> = (0..3)
        .map(|b| START + b * HOUR)
        .chain([START + 3 * HOUR])
        .collect();
    for &t in &times {
        if reopen {
            drop(rt);
            rt = fx.open().await;
        }
        clock.set(t);
        rt.step(t).await.unwrap();
        // Reactions to every batch sent so far and not yet answered.
        let sent = sender.batches.lock().unwrap().clone();
        for b in sent.iter().skip(fed_reactions) {
            let rs = reactions(pop, b, t, 5 * 60_000);
            submitted += rs.len() as u64;
            for r in rt.inbox().submit_many(rs).await.unwrap() {
                assert!(matches!(r, Submitted::Accepted { .. }), "{r:?}");
            }
        }
        fed_reactions = sent.len();
    }
    // Past the horizon: complete, close the last windows.
    let end = START + 4 * HOUR;
    clock.set(end);
    rt.step(end).await.unwrap();
    rt.flush(end).await.unwrap();
    let view = rt.view("c1").unwrap();
    let batches = sender.batches.lock().unwrap().clone();
    (batches, submitted, view)
}

#[tokio::test]
async fn a_campaign_runs_to_completion_and_learns() {
    let (batches, submitted, view) = run(&Fixture::new(START - 1_000), false).await;
    assert_eq!(view.status, Some(Status::Completed), "{view:?}");
    assert_eq!(view.sent, 600);
    assert_eq!(batches.len(), 3, "each batch sent once");
    assert_eq!(view.reactions, submitted, "every reaction counted once");
    assert!(submitted > 50, "{submitted}");
    assert_eq!(view.fed, 2, "batches 0 and 1 fed before planning 1 and 2");
    // Every message id once, users once across batches.
    let mut users: Vec<u32> = batches
        .iter()
        .flat_map(|b| b.decisions.users.clone())
        .collect();
    users.sort_unstable();
    let n = users.len();
    users.dedup();
    assert_eq!(users.len(), n);
}

/// Reopening the runtime before every step gives the very same campaign.
#[tokio::test]
async fn a_reopened_runtime_resumes_exactly() {
    let (straight, s1, v1) = run(&Fixture::new(START - 1_000), false).await;
    let (reopened, s2, v2) = run(&Fixture::new(START - 1_000), true).await;
    assert_eq!(s1, s2);
    assert_eq!(v1, v2);
    assert_eq!(straight, reopened, "same plans, same order");
}

#[tokio::test]
async fn a_failing_sender_is_retried_and_nothing_is_recorded_before_its_ack() {
    let fx = Fixture::new(START);
    *fx.sender.fail.lock().unwrap() = 2;
    let mut rt = fx.started().await;
    let r = rt.step(START).await.unwrap();
    assert_eq!(r.send_failures, 1);
    let v = rt.view("c1").unwrap();
    assert_eq!(v.batches.len(), 1, "planned");
    assert_eq!(v.sent, 0, "not recorded as sent");
    assert!(v.send_error.is_some());
    assert!(r.next_wake_ms.unwrap() <= START + 1_000, "{r:?}");
    // Not yet time to retry.
    let r = rt.step(START + 10).await.unwrap();
    assert_eq!(r.send_failures, 0);
    assert_eq!(r.batches_sent, 0);
    let r = rt.step(START + 1_000).await.unwrap();
    assert_eq!(r.send_failures, 1, "second failure; backoff doubles");
    let r = rt.step(START + 3_000).await.unwrap();
    assert_eq!(r.batches_sent, 1);
    let v = rt.view("c1").unwrap();
    assert_eq!(v.sent, 200);
    assert!(v.send_error.is_none());
}

#[tokio::test]
async fn bad_reactions_are_dead_lettered_with_their_reason() {
    let fx = Fixture::new(START);
    let mut rt = fx.started().await;
    rt.step(START).await.unwrap();
    let inbox = rt.inbox();
    let cases: Vec<(&[u8], &str)> = vec![
        (b"\xff\xfe not utf-8", "not a JSON object"),
        (b"[1,2]", "not a JSON object"),
        (br#"{"batch":0}"#, "no \"campaign\" field"),
        (br#"{"campaign":"nope","batch":0}"#, "unknown campaign"),
    ];
    for (payload, want) in &cases {
        match inbox
            .submit(bytes::Bytes::copy_from_slice(payload))
            .await
            .unwrap()
        {
            Submitted::Unrouted { reason } => assert!(reason.contains(want), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
    let big = vec![b' '; 20_000];
    assert!(matches!(
        inbox.submit(big).await.unwrap(),
        Submitted::Unrouted { .. }
    ));
    // Routed, then refused by the pipeline (unknown user, bad field).
    for p in [
        r#"{"campaign":"c1","batch":0,"user":4000000000,"creative":0,"reaction":"clicked","time_ms":1700000100000}"#,
        r#"{"campaign":"c1","batch":0,"user":1,"creative":"x","reaction":"clicked","time_ms":1700000100000}"#,
    ] {
        assert!(matches!(
            inbox.submit(p.as_bytes().to_vec()).await.unwrap(),
            Submitted::Accepted { .. }
        ));
    }
    rt.step(START + 60_000).await.unwrap();
    let log = rt.ports().log.clone();
    let unrouted = log
        .read_stream(&StreamId::new("reactions-unrouted").unwrap(), 1, 100)
        .await
        .unwrap();
    assert_eq!(unrouted.len(), 5);
    let dead = log
        .read_stream(&StreamId::new("reaction-dead-letters-c1").unwrap(), 1, 100)
        .await
        .unwrap();
    assert_eq!(dead.len(), 2, "the pipeline dead-lettered both");
    let text: Vec<String> = dead
        .iter()
        .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
        .collect();
    assert!(text[0].contains("unknown_user"), "{}", text[0]);
    assert!(text[1].contains("bad_field"), "{}", text[1]);
    assert_eq!(rt.view("c1").unwrap().reactions, 0);
}

#[tokio::test]
async fn bad_setups_are_refused_before_anything_is_stored() {
    let fx = Fixture::new(START);
    let pop = &fx.pop;
    let mut rt = fx.open().await;
    let head = rt.ports().log.head().await.unwrap();
    assert!(rt
        .create_campaign(setup("bad id", pop.candidates.clone()))
        .await
        .is_err());
    let mut dup = Candidates::new(3).unwrap();
    dup.push(1, &[0.0, 0.0, 0.0]).unwrap();
    dup.push(1, &[1.0, 0.0, 0.0]).unwrap();
    let e = rt.create_campaign(setup("dup", dup)).await.unwrap_err();
    assert!(e.to_string().contains("appears twice"), "{e}");
    let mut s = setup("zero", pop.candidates.clone());
    s.spec.budget = 0;
    assert!(rt.create_campaign(s).await.is_err());
    let mut s = setup("custom", pop.candidates.clone());
    s.policy = PolicySpec::Custom { name: "x".into() };
    assert!(rt.create_campaign(s).await.is_err());
    assert_eq!(rt.ports().log.head().await.unwrap(), head, "nothing stored");
    // Creating twice with the same setup is a no-op; another setup is refused.
    rt.create_campaign(setup("c1", pop.candidates.clone()))
        .await
        .unwrap();
    rt.create_campaign(setup("c1", pop.candidates.clone()))
        .await
        .unwrap();
    let mut other = setup("c1", pop.candidates.clone());
    other.seed = 12;
    assert!(rt.create_campaign(other).await.is_err());
    // Commands are checked by the campaign.
    let e = rt
        .command("c1", CampaignCommand::new("p", Action::Pause))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(rt.start("nope").await.is_err());
    let _: Option<MessageRecord> = None;
}

/// Crashes once at each named point.
struct CrashAt(Mutex<Vec<&'static str>>);

impl smartmsg_service::Hooks for CrashAt {
    fn crash(&self, point: smartmsg_service::CrashPoint<'_>) -> bool {
        use smartmsg_service::CrashPoint as P;
        let name = match point {
            P::BeforePlan { batch: 1, .. } => "before-plan",
            P::AfterPlanBeforeAck { batch: 1, .. } => "after-plan-before-ack",
            P::AfterPlanBeforeSend { batch: 1, .. } => "after-plan-before-send",
            P::AfterDeliveryBeforeRecord { batch: 1, .. } => "after-delivery-before-record",
            P::AfterFeedbackBeforeUpdate { batch: 1, .. } => "after-feedback-before-update",
            P::AfterCommitBeforeRecord { commit: 4, .. } => "after-commit-before-record",
            _ => return false,
        };
        let mut left = self.0.lock().unwrap();
        match left.iter().position(|n| *n == name) {
            Some(i) => {
                left.remove(i);
                true
            }
            None => false,
        }
    }
}

/// A crash at every point of a batch's life, each followed by a reopen
/// minutes later (the clock moved on while the process was down): the
/// campaign completes with every batch sent once and the same reactions.
#[tokio::test]
async fn crashes_at_every_point_with_time_passing_in_between() {
    let fx = Fixture::new(START);
    let (pop, clock, sender) = (&fx.pop, &fx.clock, &fx.sender);
    let hooks = Arc::new(CrashAt(Mutex::new(vec![
        "before-plan",
        "after-plan-before-ack",
        "after-plan-before-send",
        "after-delivery-before-record",
        "after-feedback-before-update",
        "after-commit-before-record",
    ])));
    let options = || {
        let mut built = RuntimeOptions::default();
        built.hooks = hooks.clone();
        built
    };
    let open = || fx.open_with(options());
    let mut rt = open().await;
    rt.create_campaign(setup("c1", pop.candidates.clone()))
        .await
        .unwrap();
    rt.start("c1").await.unwrap();
    let mut crashes = 0;
    let mut answered = 0;
    let mut submitted = 0u64;
    let mut t = START;
    while rt.view("c1").unwrap().status != Some(Status::Completed) {
        match rt.step(t).await {
            Ok(_) => {}
            Err(e) if e.is_crash() => {
                crashes += 1;
                drop(rt);
                t += 5 * 60_000; // down for five minutes
                clock.set(t);
                rt = open().await;
                continue;
            }
            Err(e) => panic!("{e}"),
        }
        let sent = sender.batches.lock().unwrap().clone();
        for b in sent.iter().skip(answered) {
            let rs = reactions(pop, b, t, 60_000);
            submitted += rs.len() as u64;
            rt.inbox().submit_many(rs).await.unwrap();
        }
        answered = sent.len();
        t += 10 * 60_000;
        clock.set(t);
        assert!(t < START + 10 * HOUR, "the campaign never completed");
    }
    assert_eq!(crashes, 6, "every crash point fired");
    rt.flush(t + HOUR).await.unwrap();
    let v = rt.view("c1").unwrap();
    assert_eq!(v.sent, 600);
    let mut ids: Vec<String> = Vec::new();
    for b in sender.batches.lock().unwrap().iter() {
        for (u, _, _) in b.decisions.iter() {
            ids.push(b.message_id(u));
        }
    }
    let delivered = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 600, "each message id of the campaign");
    assert!(delivered >= 600, "redeliveries are allowed, losses are not");
    // Reactions to a batch delivered twice were submitted twice: the
    // pipeline counts each user once.
    assert!(v.reactions > 0 && v.reactions <= submitted, "{v:?}");
    assert_eq!(
        v.batches.iter().map(|b| b.reacted).sum::<u64>(),
        v.reactions
    );
}

/// Reactions to a batch whose sending failed half-way (its users got some
/// of it) are held until the batch is recorded as sent, then counted: none
/// is refused or lost. A reaction naming another creative than the user
/// got is a dead letter with that reason.
#[tokio::test]
async fn reactions_to_a_batch_still_being_sent_wait_for_it() {
    let fx = Fixture::new(START);
    let (clock, sender) = (&fx.clock, &fx.sender);
    let mut rt = fx.started().await;
    rt.step(START).await.unwrap();
    // Batch 1 fails to go (the receiver took part of it, say).
    *sender.fail.lock().unwrap() = 3;
    let t1 = START + HOUR;
    clock.set(t1);
    let r = rt.step(t1).await.unwrap();
    assert_eq!(r.send_failures, 1);
    let plan = rt.driver("c1").unwrap().plans()[1].clone();
    // Every user of batch 1 clicks on what they got; one names another
    // creative.
    let mut msgs: Vec<bytes::Bytes> = plan
        .iter()
        .map(|(u, c, _)| clicked(1, u, c, t1 + 1_000))
        .collect();
    let (u0, c0, _) = plan.iter().next().unwrap();
    msgs[0] = clicked(1, u0, 1 - c0, t1 + 1_000);
    rt.inbox().submit_many(msgs).await.unwrap();
    // Windows close while the batch still fails to go.
    for t in [t1 + 120_000, t1 + 240_000] {
        clock.set(t);
        rt.step(t).await.unwrap();
        assert_eq!(
            rt.view("c1").unwrap().sent,
            200,
            "batch 1 not recorded sent"
        );
    }
    let v = rt.view("c1").unwrap();
    assert_eq!(v.reactions, 0, "held, not refused");
    // The batch goes; the held reactions are recorded.
    let t = t1 + 3_600_000 - 1;
    clock.set(t);
    rt.step(t).await.unwrap();
    let v = rt.view("c1").unwrap();
    assert_eq!(v.sent, 400, "{v:?}");
    assert_eq!(v.reactions, 199, "{v:?}");
    let dead = rt
        .ports()
        .log
        .read_stream(&StreamId::new("reaction-dead-letters-c1").unwrap(), 1, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    let text = String::from_utf8_lossy(&dead[0].payload);
    assert!(text.contains("not_planned"), "{text}");
    // Reserved command ids are refused.
    let e = rt
        .command("c1", CampaignCommand::new("sent-3", Action::Pause))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("reserved"), "{e}");
}

/// Reactions that arrive after their window closed are counted once each,
/// as corrections of that window, all in one append of the campaign
/// stream rather than a transaction each (on Kafka each costs a
/// transaction and a read: the cluster benchmark of issue 16 spent 200 s
/// on 1,500 of them), and a reopened runtime counts none of them again.
#[tokio::test]
async fn late_reactions_are_counted_once_each_in_one_append() {
    let fx = Fixture::new(START);
    let clock = &fx.clock;
    let mut rt = fx.started().await;
    rt.step(START).await.unwrap();
    let plan = rt.driver("c1").unwrap().plans()[0].clone();
    let in_batch_0 = |(u, c): (u32, u16)| clicked(0, u, c, START + 1_000);
    let users: Vec<(u32, u16)> = plan.iter().map(|(u, c, _)| (u, c)).collect();
    // One reaction in time; its window (one minute, 10 s grace) closes.
    rt.inbox()
        .submit_many(vec![in_batch_0(users[0])])
        .await
        .unwrap();
    let t = START + 120_000;
    clock.set(t);
    rt.step(t).await.unwrap();
    assert_eq!(rt.view("c1").unwrap().reactions, 1);
    // 40 more reactions of that window arrive: late.
    let late: Vec<bytes::Bytes> = users[1..41].iter().map(|&uc| in_batch_0(uc)).collect();
    rt.inbox().submit_many(late).await.unwrap();
    let log = Arc::clone(&rt.ports().log);
    let campaign = smartmsg_service::streams::CampaignStreams::new("c1")
        .unwrap()
        .campaign;
    let version = log.stream_version(&campaign).await.unwrap();
    let appends = log.counters().unwrap().appends;
    let t = START + 125_000;
    clock.set(t);
    rt.step(t).await.unwrap();
    assert_eq!(rt.view("c1").unwrap().reactions, 41);
    assert_eq!(
        log.stream_version(&campaign).await.unwrap(),
        version + 40,
        "one correction per late reaction"
    );
    let step_appends = log.counters().unwrap().appends - appends;
    assert!(
        step_appends < 10,
        "{step_appends} appends for a step with 40 late reactions"
    );
    // Reopened, the runtime reads the same corrections and counts none
    // of them again.
    drop((log, rt));
    let mut rt = fx.open().await;
    let t = START + 130_000;
    clock.set(t);
    rt.step(t).await.unwrap();
    assert_eq!(rt.view("c1").unwrap().reactions, 41);
    let log = &rt.ports().log;
    assert_eq!(log.stream_version(&campaign).await.unwrap(), version + 40);
}

/// Once the campaign is over and nothing new comes in, the runtime has
/// nothing to wake up for.
#[tokio::test]
async fn a_finished_runtime_sleeps() {
    let fx = Fixture::new(START - 1_000);
    let (_, _, v) = run(&fx, false).await;
    assert_eq!(v.status, Some(Status::Completed));
    fx.clock.set(START + 5 * HOUR);
    let mut rt = fx.open().await;
    rt.flush(START + 5 * HOUR).await.unwrap();
    let r = rt.step(START + 5 * HOUR + 1).await.unwrap();
    assert_eq!(r.next_wake_ms, None, "{r:?}");
}

/// A removed user is never planned nor sent again, their profile leaves
/// the pipeline (a later reaction of theirs is a dead letter), and the
/// removal survives a reopen.
#[tokio::test]
async fn a_removed_user_is_never_messaged_again_and_leaves_the_pipeline() {
    let fx = Fixture::new(START);
    let (pop, clock, sender) = (&fx.pop, &fx.clock, &fx.sender);
    let mut rt = fx.started().await;
    rt.step(START).await.unwrap();
    let b0 = sender.batches.lock().unwrap()[0].clone();
    let (sent_user, sent_creative, _) = b0.decisions.iter().next().unwrap();
    let (other_user, other_creative, _) = b0.decisions.iter().nth(1).unwrap();
    let future_user = pop
        .candidates
        .users()
        .iter()
        .copied()
        .find(|u| !b0.decisions.users.contains(u))
        .unwrap();
    let r = rt
        .remove_user(sent_user, "asked to be forgotten")
        .await
        .unwrap();
    assert!(r.recorded);
    assert_eq!(r.campaigns, vec!["c1".to_owned()]);
    assert!(rt.remove_user(future_user, "").await.unwrap().recorded);
    let again = rt.remove_user(sent_user, "again").await.unwrap();
    assert!(!again.recorded, "a second removal does nothing");
    assert_eq!(again.removed_ms, r.removed_ms);
    // Reactions of the removed user and of another after the removal.
    for (u, c) in [(sent_user, sent_creative), (other_user, other_creative)] {
        assert!(matches!(
            rt.inbox()
                .submit(clicked(0, u, c, START + 60_000))
                .await
                .unwrap(),
            Submitted::Accepted { .. }
        ));
    }
    clock.set(START + 10 * 60_000);
    rt.step(START + 10 * 60_000).await.unwrap();
    rt.flush(START + 10 * 60_000).await.unwrap();
    assert_eq!(
        rt.view("c1").unwrap().reactions,
        1,
        "only the other user counts"
    );
    let dead = rt
        .ports()
        .log
        .read_stream(&StreamId::new("reaction-dead-letters-c1").unwrap(), 1, 100)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    let text = String::from_utf8_lossy(&dead[0].payload);
    assert!(text.contains("unknown_user"), "{text}");
    // Reopened: still removed; the next batches never hold them.
    drop(rt);
    let mut rt = fx.open().await;
    assert!(rt.is_removed(sent_user) && rt.is_removed(future_user));
    for t in [START + HOUR, START + 2 * HOUR] {
        clock.set(t);
        rt.step(t).await.unwrap();
    }
    let batches = sender.batches.lock().unwrap().clone();
    assert_eq!(batches.len(), 3);
    for b in &batches[1..] {
        assert!(!b.decisions.users.contains(&sent_user));
        assert!(!b.decisions.users.contains(&future_user));
        assert_eq!(b.len(), 200, "the budget still goes out");
    }
}

/// Campaigns created with the same audience store it once: the second
/// registration points to the first campaign's chunks, both load it from
/// there after a reopen, and both run; another audience is stored anew.
#[tokio::test]
async fn campaigns_with_one_audience_store_it_once() {
    use smartmsg_service::runtime::read_registered;
    use smartmsg_service::streams::CampaignStreams;

    let fx = Fixture::new(START - 1_000);
    let (pop, clock, sender) = (&fx.pop, &fx.clock, &fx.sender);
    let p = ports(fx.dir.path(), clock, sender.clone());
    let log = Arc::clone(&p.log);
    let mut rt = Runtime::open(p, RuntimeOptions::default()).await.unwrap();
    let mut other = pop.candidates.clone();
    other.retain(|u| u % 2 == 0);
    for (id, aud) in [
        ("c1", pop.candidates.clone()),
        ("c2", pop.candidates.clone()),
        ("c3", other.clone()),
    ] {
        rt.create_campaign(setup(id, aud)).await.unwrap();
        rt.start(id).await.unwrap();
    }
    let chunks = |id: &'static str| {
        let log = Arc::clone(&log);
        async move {
            let s = CampaignStreams::new(id).unwrap().audience;
            log.read_stream(&s, 1, 10_000).await.unwrap().len()
        }
    };
    assert!(chunks("c1").await > 0);
    assert_eq!(chunks("c2").await, 0, "c2's audience is c1's, not a copy");
    assert!(chunks("c3").await > 0, "another audience is stored anew");
    let (r1, a1) = read_registered(&*log, "c1").await.unwrap().unwrap();
    let (r2, a2) = read_registered(&*log, "c2").await.unwrap().unwrap();
    let (r3, a3) = read_registered(&*log, "c3").await.unwrap().unwrap();
    assert_eq!(r1.audience_of, None);
    assert_eq!(r2.audience_of.as_deref(), Some("c1"));
    assert_eq!(r2.audience_owner(), "c1");
    assert_eq!(
        (r2.audience_from, r2.audience_chunks),
        (r1.audience_from, r1.audience_chunks)
    );
    assert_eq!(r3.audience_of, None);
    assert_eq!(a1.candidates(), &pop.candidates);
    assert_eq!(a2.candidates(), &pop.candidates);
    assert_eq!(a3.candidates(), &other);
    assert_ne!(r1.audience_digest, r3.audience_digest);

    // Reopened: every campaign loads its audience and runs to its budget.
    drop(log);
    drop(rt);
    let mut rt = fx.open().await;
    for t in (0..4).map(|b| START + b * HOUR) {
        clock.set(t);
        rt.step(t).await.unwrap();
    }
    for id in ["c1", "c2", "c3"] {
        assert_eq!(rt.view(id).unwrap().sent, 600, "{id}");
    }
    let batches = sender.batches.lock().unwrap().clone();
    let users_of = |id: &str| -> Vec<u32> {
        batches
            .iter()
            .filter(|b| b.campaign == id)
            .flat_map(|b| b.decisions.users.clone())
            .collect()
    };
    assert!(
        users_of("c3").iter().all(|u| u % 2 == 0),
        "c3 messages only its audience"
    );
    assert_eq!(users_of("c1").len(), 600);
    assert_eq!(users_of("c2").len(), 600);
    // In memory too the audience is held once: the campaigns share it,
    // and what each has left to plan selects its rows without a copy.
    let (d1, d2, d3) = (
        rt.driver("c1").unwrap(),
        rt.driver("c2").unwrap(),
        rt.driver("c3").unwrap(),
    );
    assert!(Arc::ptr_eq(d1.audience(), d2.audience()));
    assert!(!Arc::ptr_eq(d1.audience(), d3.audience()));
    for d in [d1, d2, d3] {
        let all = d.audience().candidates();
        let left = d.remaining();
        assert!(left.len() < all.len(), "{}: messaged users dropped", d.id());
        assert!(left.shares_matrix_with(all), "{}: a selection", d.id());
        // Synced at the last plan: every user is left or was messaged,
        // and the rows left are the audience's rows of their users.
        let messaged = d.campaign().messaged();
        assert!(all
            .users()
            .iter()
            .all(|&u| messaged.contains(u) || left.users().contains(&u)));
        for (i, &u) in left.users().iter().enumerate() {
            assert_eq!(left.row(i), d.audience().features(u).unwrap());
        }
    }
}
