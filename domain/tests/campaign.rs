//! Given/when/then tests of the campaign aggregate: every lifecycle
//! transition, legal and illegal, the batch and budget invariants, and
//! idempotency by command id.

use smartmsg_domain::{
    Action, BatchSchedule, BatchSizing, Campaign, CampaignCommand, CampaignError, CampaignEvent,
    CampaignSpec, Decisions, Part, SpecError, Status, MAX_PART_DECISIONS,
};
use smartmsg_engine::testkit::given;
use smartmsg_engine::{Aggregate, EventCodec};

const START: u64 = 1_000;
const INTERVAL: u64 = 100;

fn spec() -> CampaignSpec {
    CampaignSpec {
        channel: "telegram:@shop".into(),
        audience: "audience-1".into(),
        creatives: vec!["red".into(), "blue".into()],
        budget: 10,
        // Batches of 4, 3, 3.
        schedule: BatchSchedule {
            start_ms: START,
            interval_ms: INTERVAL,
            sizing: BatchSizing::Count(3),
        },
    }
}

fn cmd(id: &str, action: Action) -> CampaignCommand {
    CampaignCommand::new(id, action)
}

fn decisions(rows: &[(u32, u16)]) -> Decisions {
    let mut d = Decisions::with_capacity(rows.len());
    for &(u, c) in rows {
        d.push(u, c, 0.25);
    }
    d
}

fn plan(batch: u32, rows: &[(u32, u16)]) -> Action {
    Action::PlanBatch {
        batch,
        policy: "random".into(),
        decisions: decisions(rows),
    }
}

fn cancel() -> Action {
    Action::Cancel {
        reason: "advertiser asked".into(),
    }
}

/// The events `decide` makes for `id`/`action` in `state`, applied; panics
/// on a refusal (for building histories).
fn after(history: &[CampaignEvent], id: &str, action: Action, now: u64) -> Vec<CampaignEvent> {
    let g = given::<Campaign>(history.to_vec()).at(now);
    let events = g
        .state()
        .decide(&cmd(id, action), &g.ctx())
        .expect("history command accepted");
    let mut h = history.to_vec();
    h.extend(events);
    h
}

fn draft() -> Vec<CampaignEvent> {
    after(&[], "create", Action::Create(spec()), 0)
}
fn scheduled() -> Vec<CampaignEvent> {
    after(&draft(), "start-early", Action::Start, 0)
}
fn running() -> Vec<CampaignEvent> {
    after(&scheduled(), "start", Action::Start, START)
}
fn paused() -> Vec<CampaignEvent> {
    after(&running(), "pause", Action::Pause, START)
}
fn completed() -> Vec<CampaignEvent> {
    after(&running(), "complete", Action::Complete, START)
}
fn cancelled() -> Vec<CampaignEvent> {
    after(&running(), "cancel", cancel(), START)
}
/// Running, batch 0 (users 1, 2 with red, 3 with blue) planned, not sent.
fn planned0() -> Vec<CampaignEvent> {
    after(
        &running(),
        "plan-0",
        plan(0, &[(1, 0), (2, 0), (3, 1)]),
        START,
    )
}
fn sent0() -> Vec<CampaignEvent> {
    after(
        &planned0(),
        "sent-0",
        Action::RecordBatchSent { batch: 0 },
        START,
    )
}

fn stamp(id: &str, action: Action) -> smartmsg_domain::CommandStamp {
    cmd(id, action).stamp()
}

// ---------------------------------------------------------------- create

#[test]
fn create_makes_a_draft() {
    let state = given::<Campaign>(vec![])
        .when(cmd("c1", Action::Create(spec())))
        .then(vec![CampaignEvent::Created {
            command: stamp("c1", Action::Create(spec())),
            spec: spec(),
        }]);
    assert_eq!(state.status(), Some(Status::Draft));
    assert_eq!(state.remaining_budget(), 10);
    assert_eq!(state.next_batch(), Some(0));
    assert_eq!(state.batch_allowance(0), 4);
    assert_eq!(state.batch_allowance(2), 3);
    assert_eq!(state.batch_allowance(3), 0);
}

#[test]
fn create_twice_is_refused() {
    given::<Campaign>(draft())
        .when(cmd("c2", Action::Create(spec())))
        .then_error(|e| matches!(e, CampaignError::AlreadyCreated));
}

#[test]
fn create_with_an_invalid_spec_is_refused() {
    type Check = fn(&SpecError) -> bool;
    let cases: Vec<(CampaignSpec, Check)> = vec![
        (
            CampaignSpec {
                creatives: vec![],
                ..spec()
            },
            |e| matches!(e, SpecError::NoCreatives),
        ),
        (
            CampaignSpec {
                creatives: vec!["a".into(), "a".into()],
                ..spec()
            },
            |e| matches!(e, SpecError::DuplicateCreative { .. }),
        ),
        (
            CampaignSpec {
                budget: 0,
                ..spec()
            },
            |e| matches!(e, SpecError::ZeroBudget),
        ),
        (
            CampaignSpec {
                channel: String::new(),
                ..spec()
            },
            |e| {
                matches!(
                    e,
                    SpecError::BadReference {
                        field: "channel",
                        ..
                    }
                )
            },
        ),
        (
            CampaignSpec {
                schedule: BatchSchedule {
                    sizing: BatchSizing::Size(0),
                    ..spec().schedule
                },
                ..spec()
            },
            |e| matches!(e, SpecError::ZeroBatches),
        ),
        (
            CampaignSpec {
                schedule: BatchSchedule {
                    interval_ms: 0,
                    ..spec().schedule
                },
                ..spec()
            },
            |e| matches!(e, SpecError::ZeroInterval),
        ),
        (
            CampaignSpec {
                budget: 3 * CampaignSpec::MAX_BATCH_USERS + 3,
                ..spec()
            },
            |e| matches!(e, SpecError::BatchTooLarge { .. }),
        ),
        (
            CampaignSpec {
                creatives: (0..65).map(|i| format!("c{i}")).collect(),
                ..spec()
            },
            |e| matches!(e, SpecError::TooManyCreatives { .. }),
        ),
    ];
    for (bad, check) in cases {
        given::<Campaign>(vec![])
            .when(cmd("c1", Action::Create(bad)))
            .then_error(|e| matches!(e, CampaignError::InvalidSpec(s) if check(s)));
    }
}

#[test]
fn batch_size_plans_as_many_batches_as_the_budget_needs() {
    let s = CampaignSpec {
        schedule: BatchSchedule {
            sizing: BatchSizing::Size(4),
            ..spec().schedule
        },
        ..spec()
    };
    assert!(s.validate().is_ok());
    assert_eq!(s.batch_count(), 3);
    assert_eq!(
        (0..4).map(|b| s.nominal_batch_size(b)).collect::<Vec<_>>(),
        vec![4, 4, 2, 0]
    );
    assert_eq!(s.due_ms(2), START + 2 * INTERVAL);
}

#[test]
fn commands_before_create_are_refused() {
    for action in [
        Action::Start,
        Action::Pause,
        Action::Resume,
        cancel(),
        Action::Complete,
        plan(0, &[(1, 0)]),
        Action::RecordBatchSent { batch: 0 },
        Action::RecordReactions {
            window_start_ms: 0,
            reactions: vec![0, 0],
        },
    ] {
        given::<Campaign>(vec![])
            .when(cmd("x", action))
            .then_error(|e| matches!(e, CampaignError::NotCreated));
    }
}

// ---------------------------------------------------------------- start

#[test]
fn start_before_the_start_time_schedules() {
    let state = given::<Campaign>(draft())
        .at(START - 1)
        .when(cmd("s", Action::Start))
        .then(vec![CampaignEvent::Scheduled {
            command: stamp("s", Action::Start),
        }]);
    assert_eq!(state.status(), Some(Status::Scheduled));
}

#[test]
fn start_at_the_start_time_schedules_and_runs() {
    let state = given::<Campaign>(draft())
        .at(START)
        .when(cmd("s", Action::Start))
        .then(vec![
            CampaignEvent::Scheduled {
                command: stamp("s", Action::Start),
            },
            CampaignEvent::Started {
                command: stamp("s", Action::Start),
            },
        ]);
    assert_eq!(state.status(), Some(Status::Running));
}

#[test]
fn start_a_scheduled_campaign_when_due_runs_it() {
    let state = given::<Campaign>(scheduled())
        .at(START + 5)
        .when(cmd("s2", Action::Start))
        .then(vec![CampaignEvent::Started {
            command: stamp("s2", Action::Start),
        }]);
    assert_eq!(state.status(), Some(Status::Running));
}

#[test]
fn start_a_scheduled_campaign_too_early_is_refused() {
    given::<Campaign>(scheduled())
        .at(START - 1)
        .when(cmd("s2", Action::Start))
        .then_error(|e| {
            matches!(
                e,
                CampaignError::TooEarly {
                    start_ms: START,
                    now_ms
                } if *now_ms == START - 1
            )
        });
}

// ------------------------------------------------ the transition matrix

/// Every lifecycle action in every state: the events it makes, or that it
/// is refused as an invalid transition.
#[test]
fn every_lifecycle_transition_legal_and_illegal() {
    type Expect = Option<fn(&smartmsg_domain::CommandStamp) -> Vec<CampaignEvent>>;
    let states: Vec<(&str, Vec<CampaignEvent>, Status)> = vec![
        ("draft", draft(), Status::Draft),
        ("scheduled", scheduled(), Status::Scheduled),
        ("running", running(), Status::Running),
        ("paused", paused(), Status::Paused),
        ("completed", completed(), Status::Completed),
        ("cancelled", cancelled(), Status::Cancelled),
    ];
    let actions: Vec<Action> = vec![Action::Pause, Action::Resume, cancel(), Action::Complete];
    for (name, history, status) in states {
        for action in &actions {
            let expect: Expect = match (status, action) {
                (Status::Running, Action::Pause) => {
                    Some(|s| vec![CampaignEvent::Paused { command: s.clone() }])
                }
                (Status::Paused, Action::Resume) => {
                    Some(|s| vec![CampaignEvent::Resumed { command: s.clone() }])
                }
                (
                    Status::Draft | Status::Scheduled | Status::Running | Status::Paused,
                    Action::Cancel { .. },
                ) => Some(|s| {
                    vec![CampaignEvent::Cancelled {
                        command: s.clone(),
                        reason: "advertiser asked".into(),
                    }]
                }),
                (Status::Running | Status::Paused, Action::Complete) => {
                    Some(|s| vec![CampaignEvent::Completed { command: s.clone() }])
                }
                _ => None,
            };
            let c = cmd("t", action.clone());
            let w = given::<Campaign>(history.clone()).at(START).when(c.clone());
            match expect {
                Some(events) => {
                    let state = w.then(events(&c.stamp()));
                    let want = match action {
                        Action::Pause => Status::Paused,
                        Action::Resume => Status::Running,
                        Action::Cancel { .. } => Status::Cancelled,
                        _ => Status::Completed,
                    };
                    assert_eq!(state.status(), Some(want), "{name} + {}", action.name());
                }
                None => {
                    w.then_error(|e| {
                        matches!(e, CampaignError::InvalidTransition { action: a, status: s }
                            if *a == action.name() && *s == status)
                    });
                }
            }
        }
        // Start is legal only from draft and scheduled.
        let w = given::<Campaign>(history.clone())
            .at(START)
            .when(cmd("t", Action::Start));
        if matches!(status, Status::Draft | Status::Scheduled) {
            assert!(w.result().is_ok(), "{name} + start");
        } else {
            w.then_error(|e| {
                matches!(
                    e,
                    CampaignError::InvalidTransition {
                        action: "start",
                        ..
                    }
                )
            });
        }
        // Planning and sending need running.
        if status != Status::Running {
            given::<Campaign>(history.clone())
                .at(START)
                .when(cmd("p", plan(0, &[(1, 0)])))
                .then_error(|e| {
                    matches!(
                        e,
                        CampaignError::InvalidTransition {
                            action: "plan batch",
                            ..
                        }
                    )
                });
        }
    }
}

#[test]
fn cancel_keeps_the_reason_and_is_terminal() {
    let state = given::<Campaign>(paused())
        .when(cmd("x", cancel()))
        .then(vec![CampaignEvent::Cancelled {
            command: stamp("x", cancel()),
            reason: "advertiser asked".into(),
        }]);
    assert_eq!(state.cancel_reason(), Some("advertiser asked"));
    assert!(!state.status().unwrap().is_live());
}

#[test]
fn cancel_with_a_too_long_reason_is_refused() {
    given::<Campaign>(running())
        .when(cmd(
            "x",
            Action::Cancel {
                reason: "r".repeat(300),
            },
        ))
        .then_error(|e| matches!(e, CampaignError::ReasonTooLong { len: 300, .. }));
}

// ---------------------------------------------------------------- batches

#[test]
fn plan_batch_records_the_decisions_and_reserves_budget_and_users() {
    let action = plan(0, &[(3, 1), (1, 0), (2, 0)]);
    let state = given::<Campaign>(running())
        .at(START)
        .when(cmd("p0", action.clone()))
        .then(vec![CampaignEvent::BatchPlanned {
            command: stamp("p0", action),
            batch: 0,
            part: Part::WHOLE,
            policy: "random".into(),
            decisions: decisions(&[(3, 1), (1, 0), (2, 0)]),
        }]);
    assert_eq!(state.messaged().as_slice(), &[1, 2, 3]);
    assert_eq!((state.reserved(), state.sent()), (3, 0));
    assert_eq!(state.remaining_budget(), 7);
    assert_eq!(state.pending_batch(), Some(0));
    assert_eq!(state.batches()[0].per_creative, vec![2, 1]);
    assert_eq!(state.creative_stats()[0].planned, 2);
    let ctx = state.plan_context(1).unwrap();
    assert_eq!(ctx.planned_per_creative, vec![2, 1]);
    assert_eq!(ctx.remaining_budget, 7);
}

#[test]
fn an_empty_batch_is_allowed() {
    let state = given::<Campaign>(running())
        .at(START)
        .when(cmd("p0", plan(0, &[])))
        .then(vec![CampaignEvent::BatchPlanned {
            command: stamp("p0", plan(0, &[])),
            batch: 0,
            part: Part::WHOLE,
            policy: "random".into(),
            decisions: Decisions::default(),
        }]);
    assert_eq!(state.reserved(), 0);
}

#[test]
fn plan_batch_before_it_is_due_is_refused() {
    given::<Campaign>(sent0())
        .at(START + INTERVAL - 1)
        .when(cmd("p1", plan(1, &[(9, 0)])))
        .then_error(|e| {
            matches!(e, CampaignError::BatchNotDue { batch: 1, due_ms, .. } if *due_ms == START + INTERVAL)
        });
}

#[test]
fn plan_batch_twice_is_refused() {
    given::<Campaign>(sent0())
        .at(START)
        .when(cmd("p0-again", plan(0, &[(9, 0)])))
        .then_error(|e| matches!(e, CampaignError::BatchAlreadyPlanned { batch: 0 }));
}

#[test]
fn plan_batch_out_of_order_is_refused() {
    given::<Campaign>(running())
        .at(START + 5 * INTERVAL)
        .when(cmd("p1", plan(1, &[(9, 0)])))
        .then_error(|e| {
            matches!(
                e,
                CampaignError::BatchOutOfOrder {
                    batch: 1,
                    expected: 0
                }
            )
        });
}

#[test]
fn plan_batch_past_the_plan_is_refused() {
    given::<Campaign>(running())
        .at(START)
        .when(cmd("p9", plan(3, &[(9, 0)])))
        .then_error(|e| matches!(e, CampaignError::BatchOutOfRange { batch: 3, count: 3 }));
}

#[test]
fn plan_batch_while_the_previous_is_unsent_is_refused() {
    given::<Campaign>(planned0())
        .at(START + INTERVAL)
        .when(cmd("p1", plan(1, &[(9, 0)])))
        .then_error(|e| matches!(e, CampaignError::PreviousBatchNotSent { pending: 0 }));
}

#[test]
fn plan_batch_larger_than_planned_is_refused() {
    given::<Campaign>(running())
        .at(START)
        .when(cmd(
            "p0",
            plan(0, &[(1, 0), (2, 0), (3, 0), (4, 0), (5, 0)]),
        ))
        .then_error(|e| {
            matches!(
                e,
                CampaignError::BatchTooLarge {
                    batch: 0,
                    users: 5,
                    allowed: 4
                }
            )
        });
}

#[test]
fn budget_is_never_exceeded() {
    // Batches of 4, 3, 3 with a budget of 10: a smaller budget spec (5) runs
    // out in batch 1.
    let small = CampaignSpec {
        budget: 5,
        schedule: BatchSchedule {
            sizing: BatchSizing::Size(4),
            ..spec().schedule
        },
        ..spec()
    };
    let h = after(&[], "create", Action::Create(small), 0);
    let h = after(&h, "start", Action::Start, START);
    let h = after(&h, "p0", plan(0, &[(1, 0), (2, 0), (3, 0), (4, 0)]), START);
    let h = after(&h, "s0", Action::RecordBatchSent { batch: 0 }, START);
    given::<Campaign>(h.clone())
        .at(START + INTERVAL)
        .when(cmd("p1", plan(1, &[(5, 0), (6, 0)])))
        .then_error(|e| {
            matches!(
                e,
                CampaignError::BudgetExceeded {
                    requested: 2,
                    remaining: 1
                }
            )
        });
    let state = given::<Campaign>(h)
        .at(START + INTERVAL)
        .when(cmd("p1", plan(1, &[(5, 0)])))
        .then(vec![CampaignEvent::BatchPlanned {
            command: stamp("p1", plan(1, &[(5, 0)])),
            batch: 1,
            part: Part::WHOLE,
            policy: "random".into(),
            decisions: decisions(&[(5, 0)]),
        }]);
    assert_eq!(state.remaining_budget(), 0);
}

#[test]
fn a_user_is_messaged_at_most_once() {
    given::<Campaign>(sent0())
        .at(START + INTERVAL)
        .when(cmd("p1", plan(1, &[(7, 0), (2, 1)])))
        .then_error(|e| matches!(e, CampaignError::UserAlreadyMessaged { user: 2 }));
    given::<Campaign>(running())
        .at(START)
        .when(cmd("p0", plan(0, &[(7, 0), (7, 1)])))
        .then_error(|e| matches!(e, CampaignError::DuplicateUser { user: 7 }));
}

#[test]
fn bad_decisions_are_refused() {
    given::<Campaign>(running())
        .at(START)
        .when(cmd("p0", plan(0, &[(1, 2)])))
        .then_error(|e| {
            matches!(
                e,
                CampaignError::UnknownCreative {
                    creative: 2,
                    count: 2
                }
            )
        });
    for p in [0.0, -0.1, 1.5, f32::NAN] {
        let mut d = decisions(&[(1, 0)]);
        d.propensities[0] = p;
        let action = Action::PlanBatch {
            batch: 0,
            policy: "random".into(),
            decisions: d,
        };
        given::<Campaign>(running())
            .at(START)
            .when(cmd("p0", action))
            .then_error(|e| matches!(e, CampaignError::BadPropensity { user: 1, .. }));
    }
    let mut d = decisions(&[(1, 0)]);
    d.creatives.push(1);
    given::<Campaign>(running())
        .at(START)
        .when(cmd(
            "p0",
            Action::PlanBatch {
                batch: 0,
                policy: "random".into(),
                decisions: d,
            },
        ))
        .then_error(|e| {
            matches!(
                e,
                CampaignError::DecisionShape {
                    users: 1,
                    creatives: 2,
                    ..
                }
            )
        });
    given::<Campaign>(running())
        .at(START)
        .when(cmd(
            "p0",
            Action::PlanBatch {
                batch: 0,
                policy: String::new(),
                decisions: decisions(&[(1, 0)]),
            },
        ))
        .then_error(|e| matches!(e, CampaignError::BadPolicyName { len: 0, .. }));
}

#[test]
fn record_batch_sent_counts_messages_per_creative() {
    let state = given::<Campaign>(planned0())
        .when(cmd("s0", Action::RecordBatchSent { batch: 0 }))
        .then(vec![CampaignEvent::BatchSent {
            command: stamp("s0", Action::RecordBatchSent { batch: 0 }),
            batch: 0,
        }]);
    assert_eq!(state.sent(), 3);
    assert_eq!(state.pending_batch(), None);
    assert_eq!(state.next_batch(), Some(1));
    assert_eq!(state.creative_stats()[0].sent, 2);
    assert_eq!(state.creative_stats()[1].sent, 1);
}

#[test]
fn a_batch_is_sent_at_most_once() {
    given::<Campaign>(sent0())
        .when(cmd("s0-again", Action::RecordBatchSent { batch: 0 }))
        .then_error(|e| matches!(e, CampaignError::BatchAlreadySent { batch: 0 }));
    given::<Campaign>(sent0())
        .when(cmd("s1", Action::RecordBatchSent { batch: 1 }))
        .then_error(|e| matches!(e, CampaignError::BatchNotPlanned { batch: 1 }));
}

#[test]
fn paused_and_cancelled_campaigns_send_nothing() {
    let paused_with_batch = after(&planned0(), "pause", Action::Pause, START);
    given::<Campaign>(paused_with_batch.clone())
        .when(cmd("s0", Action::RecordBatchSent { batch: 0 }))
        .then_error(|e| {
            matches!(
                e,
                CampaignError::InvalidTransition {
                    action: "record batch sent",
                    status: Status::Paused
                }
            )
        });
    let cancelled_with_batch = after(&planned0(), "cancel", cancel(), START);
    given::<Campaign>(cancelled_with_batch)
        .when(cmd("s0", Action::RecordBatchSent { batch: 0 }))
        .then_error(|e| {
            matches!(
                e,
                CampaignError::InvalidTransition {
                    action: "record batch sent",
                    status: Status::Cancelled
                }
            )
        });
    // Resumed, the pending batch may go.
    let resumed = after(&paused_with_batch, "resume", Action::Resume, START);
    given::<Campaign>(resumed)
        .when(cmd("s0", Action::RecordBatchSent { batch: 0 }))
        .then(vec![CampaignEvent::BatchSent {
            command: stamp("s0", Action::RecordBatchSent { batch: 0 }),
            batch: 0,
        }]);
}

#[test]
fn complete_with_a_batch_in_flight_is_refused() {
    given::<Campaign>(planned0())
        .when(cmd("done", Action::Complete))
        .then_error(|e| matches!(e, CampaignError::BatchInFlight { batch: 0 }));
    given::<Campaign>(sent0())
        .when(cmd("done", Action::Complete))
        .then(vec![CampaignEvent::Completed {
            command: stamp("done", Action::Complete),
        }]);
}

// -------------------------------------------------------------- reactions

fn reactions(r: Vec<u32>) -> Action {
    Action::RecordReactions {
        window_start_ms: START + 60_000,
        reactions: r,
    }
}

#[test]
fn record_reactions_adds_per_creative_counts() {
    let state = given::<Campaign>(sent0())
        .when(cmd("r1", reactions(vec![1, 1])))
        .then(vec![CampaignEvent::ReactionsRecorded {
            command: stamp("r1", reactions(vec![1, 1])),
            window_start_ms: START + 60_000,
            reactions: vec![1, 1],
        }]);
    assert_eq!(state.creative_stats()[0].reactions, 1);
    // Late reactions still count after completion or cancellation.
    for h in [
        after(&sent0(), "done", Action::Complete, START),
        after(&sent0(), "cancel", cancel(), START),
        after(&sent0(), "pause", Action::Pause, START),
    ] {
        given::<Campaign>(h)
            .when(cmd("r1", reactions(vec![2, 0])))
            .then(vec![CampaignEvent::ReactionsRecorded {
                command: stamp("r1", reactions(vec![2, 0])),
                window_start_ms: START + 60_000,
                reactions: vec![2, 0],
            }]);
    }
}

#[test]
fn reactions_beyond_the_messages_sent_are_refused() {
    given::<Campaign>(sent0())
        .when(cmd("r1", reactions(vec![0, 2])))
        .then_error(|e| {
            matches!(
                e,
                CampaignError::ReactionsExceedSends {
                    creative: 1,
                    reactions: 2,
                    sent: 1
                }
            )
        });
    // Planned but not sent: nothing to react to yet.
    given::<Campaign>(planned0())
        .when(cmd("r1", reactions(vec![1, 0])))
        .then_error(|e| matches!(e, CampaignError::ReactionsExceedSends { creative: 0, .. }));
    given::<Campaign>(sent0())
        .when(cmd("r1", reactions(vec![1])))
        .then_error(|e| {
            matches!(
                e,
                CampaignError::ReactionsShape {
                    expected: 2,
                    got: 1
                }
            )
        });
    given::<Campaign>(scheduled())
        .when(cmd("r1", reactions(vec![0, 0])))
        .then_error(|e| matches!(e, CampaignError::InvalidTransition { .. }));
}

// ------------------------------------------------------------ idempotency

#[test]
fn a_retried_command_produces_nothing() {
    let retries: Vec<(Vec<CampaignEvent>, &str, Action)> = vec![
        (draft(), "create", Action::Create(spec())),
        (scheduled(), "start-early", Action::Start),
        (running(), "start", Action::Start),
        (paused(), "pause", Action::Pause),
        (cancelled(), "cancel", cancel()),
        (completed(), "complete", Action::Complete),
        (planned0(), "plan-0", plan(0, &[(1, 0), (2, 0), (3, 1)])),
        (sent0(), "sent-0", Action::RecordBatchSent { batch: 0 }),
    ];
    for (history, id, action) in retries {
        let before = given::<Campaign>(history.clone()).state().clone();
        let state = given::<Campaign>(history)
            .at(START + 10 * INTERVAL)
            .when(cmd(id, action))
            .then_nothing();
        assert_eq!(state, before, "{id}");
    }
    let h = after(&sent0(), "r1", reactions(vec![1, 0]), START);
    given::<Campaign>(h)
        .when(cmd("r1", reactions(vec![1, 0])))
        .then_nothing();
}

#[test]
fn a_command_id_reused_for_another_command_is_refused() {
    given::<Campaign>(sent0())
        .when(cmd("sent-0", Action::Pause))
        .then_error(|e| matches!(e, CampaignError::CommandIdReused { id } if id == "sent-0"));
    given::<Campaign>(planned0())
        .when(cmd("plan-0", plan(0, &[(1, 0), (2, 0), (3, 0)])))
        .then_error(|e| matches!(e, CampaignError::CommandIdReused { .. }));
    let h = after(&sent0(), "r1", reactions(vec![1, 0]), START);
    given::<Campaign>(h)
        .when(cmd("r1", reactions(vec![0, 1])))
        .then_error(|e| matches!(e, CampaignError::CommandIdReused { .. }));
}

#[test]
fn bad_command_ids_are_refused() {
    for id in [String::new(), "x".repeat(65)] {
        let len = id.len();
        given::<Campaign>(vec![])
            .when(cmd(&id, Action::Create(spec())))
            .then_error(
                |e| matches!(e, CampaignError::BadCommandId { len: l, max: 64 } if *l == len),
            );
    }
}

// ---------------------------------------------------- codec and snapshots

#[test]
fn events_have_stable_kinds_and_reject_unknown_ones() {
    let h = sent0();
    let kinds: Vec<&str> = h.iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        vec![
            "CampaignCreated",
            "CampaignScheduled",
            "CampaignStarted",
            "BatchPlanned",
            "BatchSent"
        ]
    );
    let planned = &h[3];
    let payload = planned.encode();
    assert_eq!(planned.schema(), smartmsg_domain::PLANNED_SCHEMA);
    // Binary columns: users 1, 2, 3 as u32 LE, then creatives, then 0.25f32.
    let users: Vec<u8> = [1u32, 2, 3].iter().flat_map(|u| u.to_le_bytes()).collect();
    assert!(payload.windows(12).any(|w| w == users.as_slice()));
    assert!(payload.ends_with(&[0.25f32.to_le_bytes(); 3].concat()));
    assert!(matches!(
        CampaignEvent::decode("Nope", 1, &payload),
        Err(smartmsg_engine::DecodeError::UnknownKind { .. })
    ));
    // Schema 3 is a part of a larger batch: this payload is not one.
    assert!(matches!(
        CampaignEvent::decode("BatchPlanned", 3, &payload),
        Err(smartmsg_engine::DecodeError::BadPayload { schema: 3, .. })
    ));
    assert!(matches!(
        CampaignEvent::decode("BatchPlanned", 4, &payload),
        Err(smartmsg_engine::DecodeError::UnknownSchema { schema: 4, .. })
    ));
    assert!(matches!(
        CampaignEvent::decode("BatchPlanned", 1, &payload),
        Err(smartmsg_engine::DecodeError::BadPayload { .. })
    ));
    assert!(matches!(
        CampaignEvent::decode("BatchSent", 1, b"{}"),
        Err(smartmsg_engine::DecodeError::BadPayload { .. })
    ));
}

/// A spec with one batch of the largest size.
fn one_huge_batch() -> CampaignSpec {
    CampaignSpec {
        budget: CampaignSpec::MAX_BATCH_USERS,
        schedule: BatchSchedule {
            start_ms: START,
            interval_ms: INTERVAL,
            sizing: BatchSizing::Count(1),
        },
        creatives: (0..64).map(|c| format!("creative-{c}")).collect(),
        ..spec()
    }
}

#[test]
fn the_largest_batch_fits_one_transaction_of_the_engine_limits() {
    let n = CampaignSpec::MAX_BATCH_USERS as u32;
    let mut d = Decisions::with_capacity(n as usize);
    for i in 0..n {
        // Large ids and propensities with many digits: the worst case.
        d.push(u32::MAX - i, 63, 1.0 / 3.0 / (i + 7) as f32);
    }
    let action = Action::PlanBatch {
        batch: 0,
        policy: "p".repeat(64),
        decisions: d.clone(),
    };
    let id = "x".repeat(CampaignCommand::MAX_ID_LEN);
    let history = after(
        &after(&[], "create", Action::Create(one_huge_batch()), 0),
        "start",
        Action::Start,
        START,
    );
    let g = given::<Campaign>(history.clone()).at(START);
    let events = g.state().decide(&cmd(&id, action), &g.ctx()).unwrap();
    let parts = CampaignSpec::MAX_BATCH_USERS.div_ceil(MAX_PART_DECISIONS as u64);
    assert_eq!(events.len() as u64, parts);
    // Each part is an event under the event limit, with the longest kind
    // and metadata ids the engine allows; all of them one transaction
    // under the transaction limit.
    let limits = smartmsg_engine::Limits::default();
    let overhead = limits.max_kind_len + 2 * limits.max_id_len;
    let mut tx = 0;
    let mut joined = Decisions::default();
    for (i, e) in events.iter().enumerate() {
        let bytes = e.encode().len() + overhead;
        assert!(bytes <= limits.max_event_bytes, "part {i}: {bytes} bytes");
        tx += bytes;
        assert_eq!(e.schema(), smartmsg_domain::PLANNED_PARTS_SCHEMA);
        let back = CampaignEvent::decode(e.kind(), e.schema(), &e.encode()).unwrap();
        assert_eq!(&back, e);
        match back {
            CampaignEvent::BatchPlanned {
                part, decisions, ..
            } => {
                assert_eq!(
                    part,
                    Part {
                        index: i as u32,
                        count: parts as u32
                    }
                );
                joined.append(&decisions);
            }
            other => panic!("not a part: {other:?}"),
        }
    }
    assert!(tx <= limits.max_tx_bytes, "{tx} bytes in the transaction");
    assert!(events.len() <= limits.max_tx_events);
    assert_eq!(joined, d, "the parts join back into the batch, in order");

    // Folded, the parts are one batch.
    let mut h = history;
    h.extend(events);
    let state = given::<Campaign>(h).state().clone();
    assert_eq!(state.batches().len(), 1);
    assert_eq!(state.batches()[0].users, n);
    assert_eq!(state.batches()[0].per_creative[63], n);
    assert_eq!(state.reserved(), u64::from(n));
    assert_eq!(state.messaged().len(), n as usize);
    assert_eq!(state.pending_batch(), Some(0));
}

#[test]
fn a_batch_above_the_part_size_is_planned_in_parts_and_sends_as_one() {
    let n = MAX_PART_DECISIONS as u32 * 2 + 5;
    let spec = CampaignSpec {
        budget: u64::from(n) * 2,
        schedule: BatchSchedule {
            start_ms: START,
            interval_ms: INTERVAL,
            sizing: BatchSizing::Count(2),
        },
        ..spec()
    };
    let rows: Vec<(u32, u16)> = (0..n).map(|u| (u * 3, (u % 2) as u16)).collect();
    let h = after(&[], "create", Action::Create(spec), 0);
    let h = after(&h, "start", Action::Start, START);
    let h = after(&h, "plan-0", plan(0, &rows), START);
    let parts: Vec<Part> = h
        .iter()
        .filter_map(|e| match e {
            CampaignEvent::BatchPlanned {
                part, decisions, ..
            } => {
                assert!(decisions.len() <= MAX_PART_DECISIONS);
                Some(*part)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        parts,
        (0..3)
            .map(|index| Part { index, count: 3 })
            .collect::<Vec<_>>()
    );
    // The same command again decides nothing (idempotent, all parts).
    let g = given::<Campaign>(h.clone()).at(START);
    assert!(g
        .state()
        .decide(&cmd("plan-0", plan(0, &rows)), &g.ctx())
        .unwrap()
        .is_empty());
    let h = after(&h, "sent-0", Action::RecordBatchSent { batch: 0 }, START);
    let state = given::<Campaign>(h.clone()).state().clone();
    assert_eq!(state.sent(), u64::from(n));
    assert_eq!(state.batches().len(), 1);
    assert_eq!(
        state.creative_stats()[0].sent + state.creative_stats()[1].sent,
        u64::from(n)
    );
    // A user of the last part is still refused in the next batch.
    let g = given::<Campaign>(h).at(START + INTERVAL);
    let again = g
        .state()
        .decide(&cmd("plan-1", plan(1, &[((n - 1) * 3, 0)])), &g.ctx());
    assert!(
        matches!(again, Err(CampaignError::UserAlreadyMessaged { .. })),
        "{again:?}"
    );
}

#[test]
fn snapshots_round_trip_the_state() {
    let h = after(&sent0(), "r1", reactions(vec![1, 1]), START);
    let state = given::<Campaign>(h).state().clone();
    let bytes = state.encode_snapshot().unwrap();
    assert_eq!(Campaign::decode_snapshot(&bytes).unwrap(), state);
    assert!(Campaign::decode_snapshot(b"garbage").is_none());
}
