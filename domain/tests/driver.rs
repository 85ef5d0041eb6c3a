//! The campaign driver, given/when/then: given the events it applied and
//! what the pipeline and the sender reported, when time comes, then it asks
//! for exactly the next steps.

use std::sync::Arc;

use smartmsg_domain::driver::{campaign_job, parse_job, JobKind};
use smartmsg_domain::reactions::{Cell, ReactionWindow};
use smartmsg_domain::synthetic::{InMemoryCampaign, Population, ResponseTruth};
use smartmsg_domain::{
    Action, Audience, BatchSchedule, BatchSizing, CampaignCommand, CampaignDriver, CampaignSpec,
    DriverConfig, Feedback, JobError, PolicySpec, Ready, Status,
};

const START: u64 = 1_000_000;
const HOUR: u64 = 3_600_000;

fn spec() -> CampaignSpec {
    CampaignSpec {
        channel: "test".into(),
        audience: "pop".into(),
        creatives: vec!["a".into(), "b".into()],
        budget: 300,
        schedule: BatchSchedule {
            start_ms: START,
            interval_ms: HOUR,
            sizing: BatchSizing::Count(3),
        },
    }
}

fn audience() -> Arc<Audience> {
    use rand::SeedableRng;
    let truth = ResponseTruth::segmented(2, 3, 0.1, 1.0);
    let pop =
        Population::generate(2_000, truth, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1)).unwrap();
    Arc::new(Audience::new(pop.candidates).unwrap())
}

fn config() -> DriverConfig {
    {
        let mut v = DriverConfig::default();
        v.seed = 7;
        v.stream = 1;
        v.window_ms = 60_000;
        v.grace_ms = 10_000;
        v.reaction_horizon_ms = HOUR;
        v
    }
}

/// A driver and the campaign it drives, in memory.
struct Given {
    d: CampaignDriver<'static>,
    c: InMemoryCampaign,
}

impl Given {
    fn new(policy: PolicySpec) -> Self {
        let aud = audience();
        let p = policy.build(2, aud.dim(), 100).unwrap();
        Self {
            d: CampaignDriver::new("c1", config(), p, aud),
            c: InMemoryCampaign::default(),
        }
    }

    fn created_and_started(policy: PolicySpec) -> Self {
        let mut g = Self::new(policy);
        g.exec(
            CampaignCommand::new("create", Action::Create(spec())),
            START,
        );
        g.exec(CampaignCommand::new("start", Action::Start), START);
        g
    }

    fn exec(&mut self, cmd: CampaignCommand, now: u64) -> usize {
        let events = self.c.run(&cmd, now).unwrap();
        for e in &events {
            self.d.apply(e, now);
        }
        self.d.executed(&cmd.id);
        events.len()
    }

    /// Fires batch `b`'s job at `now` and executes its command.
    fn plan(&mut self, b: u32, now: u64) {
        let cmd = self.d.job_command(JobKind::Batch(b), now).unwrap();
        assert_eq!(cmd.id, format!("plan-{b}"));
        assert_eq!(self.exec(cmd, now), 1);
    }

    /// Announces, sends and records batch `b` (what a runtime does after
    /// planning).
    fn send(&mut self, b: u32, now: u64) {
        let r = self.d.ready(now);
        assert_eq!(r.announce, Some(b), "{r:?}");
        assert_eq!(r.send, None, "not sent before the pipeline knows it");
        self.d.announced(b);
        let r = self.d.ready(now);
        assert_eq!(r.send, Some(b));
        assert!(r.commands.is_empty(), "nothing recorded before the ack");
        let out = self.d.outgoing(b).unwrap();
        assert_eq!(out.len(), 100);
        self.d.sender_acked(b);
        let r = self.d.ready(now);
        assert_eq!(r.send, None);
        assert_eq!(
            r.commands,
            vec![CampaignCommand::new(
                format!("sent-{b}"),
                Action::RecordBatchSent { batch: b }
            )]
        );
        self.exec(r.commands[0].clone(), now);
    }
}

fn only_jobs(r: &Ready) -> Vec<(String, JobKind, u64)> {
    assert!(r.commands.is_empty() && r.feedback.is_empty(), "{r:?}");
    assert!(r.announce.is_none() && r.send.is_none(), "{r:?}");
    r.schedule
        .iter()
        .map(|j| {
            let (c, k) = parse_job(j).unwrap();
            (c, k, j.due_ms)
        })
        .collect()
}

#[test]
fn a_started_campaign_schedules_its_batches_once() {
    let mut g = Given::created_and_started(PolicySpec::Random {});
    let r = g.d.ready(START);
    assert_eq!(
        only_jobs(&r),
        vec![
            ("c1".into(), JobKind::Batch(0), START),
            ("c1".into(), JobKind::Batch(1), START + HOUR),
            ("c1".into(), JobKind::Batch(2), START + 2 * HOUR),
        ]
    );
    g.d.scheduled(&r.schedule);
    assert!(g.d.ready(START).is_empty());
}

#[test]
fn a_batch_goes_plan_announce_send_record() {
    let mut g = Given::created_and_started(PolicySpec::Random {});
    let r = g.d.ready(START);
    g.d.scheduled(&r.schedule);
    g.plan(0, START);
    g.send(0, START);
    assert_eq!(g.c.state.sent(), 100);
    assert!(g.d.ready(START + 1).is_empty());
    // A redelivered job of a planned batch is refused (acked), not re-planned.
    let e = g.d.job_command(JobKind::Batch(0), START + 2).unwrap_err();
    assert!(
        matches!(e, JobError::Refused(_)) && !e.is_retryable(),
        "{e}"
    );
}

#[test]
fn feedback_is_recorded_before_the_next_plan_from_closed_windows_only() {
    let mut g = Given::created_and_started(PolicySpec::Integrated {
        model: Default::default(),
    });
    let r = g.d.ready(START);
    g.d.scheduled(&r.schedule);
    g.plan(0, START);
    g.send(0, START);
    let users: Vec<u32> = g.d.plans()[0].users.clone();
    let due1 = START + HOUR;
    // Two reactions: one long before the cut, one in the last minute (its
    // window is still open at the cut).
    g.d.reaction(0, users[3], START + 5 * 60_000);
    g.d.reaction(0, users[5], due1 - 30_000);
    g.d.reaction(0, users[3], START + 9 * 60_000); // a repeat: ignored
                                                   // Not ready to plan batch 1 before its feedback is recorded.
    let e = g.d.job_command(JobKind::Batch(1), due1).unwrap_err();
    assert!(e.is_retryable(), "{e}");
    // Nothing to feed before batch 1 is due.
    assert!(g.d.ready(due1 - 1).feedback.is_empty());
    let r = g.d.ready(due1);
    let mut want = vec![users[3]];
    want.sort_unstable();
    assert_eq!(r.feedback, vec![Feedback::new(0, want)]);
    g.d.apply_feedback(&r.feedback[0]).unwrap();
    assert_eq!(g.d.fed(), 1);
    assert!(g.d.ready(due1).feedback.is_empty(), "fed once");
    g.plan(1, due1);
}

#[test]
fn windows_and_late_reactions_become_commands_once() {
    let mut g = Given::created_and_started(PolicySpec::Random {});
    let r = g.d.ready(START);
    g.d.scheduled(&r.schedule);
    g.plan(0, START);
    g.send(0, START);
    let w = ReactionWindow {
        campaign: "c1".into(),
        start_ms: START + 60_000,
        end_ms: START + 120_000,
        cells: vec![Cell {
            creative: 1,
            bucket: 0,
            delivered: 2,
            reacted: 2,
            feature_sum: vec![0.0; 3],
            users: 2,
        }],
    };
    g.d.window_closed(&w);
    g.d.window_closed(&w); // delivered twice
    g.d.late_reaction("late-0-3".into(), START, 0);
    let r = g.d.ready(START + 200_000);
    assert_eq!(r.commands.len(), 2, "{r:?}");
    for cmd in r.commands {
        assert_eq!(g.exec(cmd, START + 200_000), 1);
    }
    assert!(g.d.ready(START + 200_000).is_empty());
    // After a restart the same window is delivered again: nothing to do.
    g.d.window_closed(&w);
    assert!(g.d.ready(START + 200_000).is_empty());
    let stats = g.c.state.creative_stats();
    assert_eq!((stats[0].reactions, stats[1].reactions), (1, 2));
}

/// Many queued commands leave the queue one by one in any order (those
/// executed, those applied from the log); the rest stay in the order they
/// were queued, and a command executed without effect can be queued again
/// (at the end).
#[test]
fn queued_commands_leave_in_any_order_and_the_rest_keep_theirs() {
    let mut g = Given::created_and_started(PolicySpec::Random {});
    let r = g.d.ready(START);
    g.d.scheduled(&r.schedule);
    g.plan(0, START);
    g.send(0, START);
    let ids = |r: &Ready| -> Vec<String> { r.commands.iter().map(|c| c.id.clone()).collect() };
    let n = 5_000;
    for i in 0..n {
        g.d.late_reaction(format!("late-{i}"), START, (i % 2) as u16);
    }
    let now = START + 200_000;
    let all = ids(&g.d.ready(now));
    assert_eq!(all.len(), n);
    assert_eq!(all[..3], ["late-0", "late-1", "late-2"]);
    // Every third one leaves, last first: a few recorded (their events
    // applied), the others only marked executed (as after a refusal), so
    // they may come again.
    for i in (0..n).step_by(3).rev() {
        if i < 60 {
            let r = g.d.ready(now);
            let cmd = r.commands.iter().find(|c| c.id == format!("late-{i}"));
            assert_eq!(g.exec(cmd.unwrap().clone(), now), 1);
        } else {
            g.d.executed(&format!("late-{i}"));
        }
    }
    let want: Vec<String> = (0..n)
        .filter(|i| i % 3 != 0)
        .map(|i| format!("late-{i}"))
        .collect();
    assert_eq!(ids(&g.d.ready(now)), want);
    g.d.late_reaction("late-300".into(), START, 0);
    g.d.late_reaction("late-1".into(), START, 1); // still queued: once
    let mut want = want;
    want.push("late-300".into());
    assert_eq!(ids(&g.d.ready(now)), want);
    g.d.late_reaction("late-3".into(), START, 1); // recorded: not again
    assert_eq!(ids(&g.d.ready(now)), want);
    for id in want {
        g.d.executed(&id);
    }
    assert!(g.d.ready(now).is_empty());
}

#[test]
fn a_paused_campaign_waits_and_a_resumed_one_schedules_again() {
    let mut g = Given::created_and_started(PolicySpec::Random {});
    let r = g.d.ready(START);
    g.d.scheduled(&r.schedule);
    g.exec(CampaignCommand::new("pause", Action::Pause), START);
    let e = g.d.job_command(JobKind::Batch(0), START).unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(g.d.ready(START).is_empty(), "nothing while paused");
    g.exec(CampaignCommand::new("resume", Action::Resume), START + 10);
    let jobs = only_jobs(&g.d.ready(START + 10));
    assert_eq!(jobs.len(), 3, "every unplanned batch again");
    g.plan(0, START + 10);
    // Paused after planning: the batch waits unsent.
    g.exec(CampaignCommand::new("pause-2", Action::Pause), START + 11);
    g.d.announced(0);
    assert_eq!(g.d.ready(START + 12).send, None);
}

#[test]
fn completion_follows_the_last_batch_by_the_horizon() {
    let mut g = Given::created_and_started(PolicySpec::Random {});
    let r = g.d.ready(START);
    g.d.scheduled(&r.schedule);
    for b in 0..3 {
        let now = START + u64::from(b) * HOUR;
        let r = g.d.ready(now);
        for f in &r.feedback {
            g.d.apply_feedback(f).unwrap();
        }
        assert_eq!(
            g.d.job_command(JobKind::Complete, now).unwrap_err(),
            JobError::NotReady("batches are left to send".into())
        );
        g.plan(b, now);
        g.send(b, now);
    }
    let last = START + 2 * HOUR;
    let jobs = only_jobs(&g.d.ready(last));
    assert_eq!(jobs, vec![("c1".into(), JobKind::Complete, last + HOUR)]);
    let cmd = g.d.job_command(JobKind::Complete, last + HOUR).unwrap();
    g.exec(cmd, last + HOUR);
    assert_eq!(g.c.state.status(), Some(Status::Completed));
    assert!(matches!(
        g.d.job_command(JobKind::Batch(1), last + HOUR),
        Err(JobError::Refused(_))
    ));
}

#[test]
fn a_cancelled_campaign_sends_nothing_more() {
    let mut g = Given::created_and_started(PolicySpec::Random {});
    let r = g.d.ready(START);
    g.d.scheduled(&r.schedule);
    g.plan(0, START);
    g.d.announced(0);
    g.exec(
        CampaignCommand::new(
            "cancel",
            Action::Cancel {
                reason: "test".into(),
            },
        ),
        START,
    );
    let r = g.d.ready(START + 1);
    assert_eq!(r.send, None);
    assert!(r.schedule.is_empty());
    assert!(matches!(
        g.d.job_command(JobKind::Batch(1), START + HOUR),
        Err(JobError::Refused(_))
    ));
}

/// A driver rebuilt from the events and the recorded feedback (as after a
/// crash) plans the next batch exactly like the original one.
#[test]
fn a_rebuilt_driver_decides_the_same() {
    let spec_p = PolicySpec::Integrated {
        model: Default::default(),
    };
    let mut g = Given::created_and_started(spec_p.clone());
    let mut stamped = Vec::new();
    let r = g.d.ready(START);
    g.d.scheduled(&r.schedule);
    g.plan(0, START);
    g.send(0, START);
    for &u in g.d.plans()[0].users.clone().iter().step_by(7) {
        g.d.reaction(0, u, START + 60_000);
    }
    let due1 = START + HOUR;
    let r = g.d.ready(due1);
    for f in &r.feedback {
        g.d.apply_feedback(f).unwrap();
        stamped.push(f.clone());
    }
    let original = g.d.job_command(JobKind::Batch(1), due1).unwrap();

    let aud = audience();
    let p = spec_p.build(2, aud.dim(), 100).unwrap();
    let mut again = CampaignDriver::new("c1", config(), p, aud);
    for e in &g.c.events {
        again.apply(e, START);
    }
    for f in &stamped {
        again.apply_feedback(f).unwrap();
    }
    let rebuilt = again.job_command(JobKind::Batch(1), due1).unwrap();
    assert_eq!(rebuilt, original);
    // The job ids name the campaign; a job round-trips.
    let j = campaign_job("c1", JobKind::Batch(4), 9);
    assert_eq!(j.id.as_str(), "c1/batch-4");
    assert_eq!(parse_job(&j).unwrap(), ("c1".into(), JobKind::Batch(4)));
}

#[test]
fn removed_users_are_neither_planned_nor_sent() {
    let mut g = Given::created_and_started(PolicySpec::Random {});
    let r = g.d.ready(START);
    g.d.scheduled(&r.schedule);
    g.plan(0, START);
    let plan: Vec<u32> = g.d.outgoing(0).unwrap().decisions.users;
    // Removed after planning, before sending: left out of what is sent.
    let gone = plan[3];
    let never: u32 = (0..audience().len() as u32)
        .find(|u| !plan.contains(u))
        .unwrap();
    g.d.remove_users(&[gone, never]);
    assert_eq!(g.d.removed_in_plan(0), vec![gone]);
    let out = g.d.outgoing(0).unwrap();
    assert_eq!(out.len(), 99);
    assert!(!out.decisions.users.contains(&gone));
    g.d.announced(0);
    g.d.sender_acked(0);
    let r = g.d.ready(START);
    g.exec(r.commands[0].clone(), START);
    // Never planned again.
    for b in 1..3u32 {
        let due = START + u64::from(b) * HOUR;
        let r = g.d.ready(due);
        for f in &r.feedback {
            g.d.apply_feedback(f).unwrap();
        }
        g.plan(b, due);
        let d = g.d.outgoing(b).unwrap().decisions;
        assert!(!d.users.contains(&gone) && !d.users.contains(&never));
        assert_eq!(d.len(), 100);
        g.send(b, due);
    }
    assert!(g.d.removed().contains(gone) && g.d.removed().contains(never));
}

#[test]
fn the_feedback_of_the_largest_batch_fits_one_transaction_in_parts() {
    use smartmsg_engine::{Limits, NewEvent};
    let n = CampaignSpec::MAX_BATCH_USERS as u32;
    // Every user of the largest batch reacted, every id ten digits: the
    // worst case.
    let all: Vec<u32> = (0..n).map(|i| u32::MAX - n + i).collect();
    let whole = Feedback::new(7, all.clone());
    let parts = whole.clone().into_parts();
    assert_eq!(parts.len(), all.len().div_ceil(Feedback::MAX_PART_USERS));
    let limits = Limits::default();
    let overhead = limits.max_kind_len + 2 * limits.max_id_len;
    let mut tx = 0;
    let mut pending = None;
    let mut joined = None;
    for (i, p) in parts.iter().enumerate() {
        let body = serde_json::to_vec(p).unwrap();
        let e = NewEvent::new(
            smartmsg_domain::driver::FEEDBACK_KIND,
            smartmsg_domain::driver::FEEDBACK_SCHEMA,
            0,
            body.clone(),
        );
        let size = e.size() + overhead;
        assert!(size <= limits.max_event_bytes, "part {i}: {size} bytes");
        tx += size;
        let back: Feedback = serde_json::from_slice(&body).unwrap();
        assert_eq!(&back, p);
        let done = Feedback::join(&mut pending, back);
        assert_eq!(done.is_some(), i + 1 == parts.len());
        joined = joined.or(done);
    }
    assert!(tx <= limits.max_tx_bytes, "{tx} bytes in the transaction");
    assert_eq!(joined, Some(whole), "the parts join back, whole");
    // Small feedback is one event, written as before parts existed.
    let small = Feedback::new(1, vec![3, 5]);
    assert_eq!(small.clone().into_parts(), vec![small.clone()]);
    assert_eq!(
        serde_json::to_string(&small).unwrap(),
        r#"{"batch":1,"reacted":[3,5]}"#
    );
}
