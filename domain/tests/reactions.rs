//! The reaction pipeline through the engine's TestDriver, the runner on an
//! in-memory log feeding the per-user outcome projection, and a fuzz of the
//! reaction parser.

use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use smartmsg_domain::reactions::{
    parse_profile, parse_reaction, reaction_topology, user_outcome_projection, CampaignInfo,
    DeadLetter, DeadReason, ReactionConfig, ReactionKind, ReactionWindow, UserOutcomes,
    UserReaction, DEAD_LETTERS, INPUT_CAMPAIGNS, INPUT_PROFILES, INPUT_REACTIONS, LATE_REACTIONS,
    REACTION_WINDOWS, USER_OUTCOMES,
};
use smartmsg_domain::{Action, CreativeThompson, Policy};
use smartmsg_engine::memory::InMemoryLog;
use smartmsg_engine::stream::{
    EventLogSink, EventLogSource, InMemoryStore, Json, LateRecord, RunnerConfig, StreamRunner,
    TestDriver, Windowed,
};
use smartmsg_engine::{
    AppendTx, EventLog, ExpectedVersion, InMemoryReadModel, NewEvent, ProjectionRunner, StreamId,
};

const T0: u64 = 1_020_000; // a window start (17 minutes)

fn config() -> ReactionConfig {
    ReactionConfig::new(2)
}

fn reaction(campaign: &str, user: u32, creative: u16, kind: &str, time_ms: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"campaign":"{campaign}","batch":0,"user":{user},"creative":{creative},"reaction":"{kind}","time_ms":{time_ms}}}"#
    ))
}

fn profile(user: u32, x: [f32; 2]) -> Bytes {
    Bytes::from(format!(
        r#"{{"user":{user},"features":[{},{}]}}"#,
        x[0], x[1]
    ))
}

fn info() -> CampaignInfo {
    CampaignInfo {
        start_ms: 1_000_000,
        end_ms: 10_000_000,
        creatives: 2,
        batches: 3,
    }
}

fn driver() -> TestDriver {
    let mut d = TestDriver::new(reaction_topology(config()).unwrap()).unwrap();
    d.pipe(INPUT_CAMPAIGNS, "c1".to_string(), Json(info()), 0)
        .unwrap();
    for (u, x) in [
        (1, [1.0, 0.0]),
        (2, [-1.0, 0.0]),
        (3, [0.0, 2.0]),
        (4, [0.0, 0.0]),
    ] {
        d.pipe(INPUT_PROFILES, Bytes::new(), profile(u, x), 0)
            .unwrap();
    }
    d
}

fn pipe(d: &mut TestDriver, msg: Bytes, ts: u64) {
    d.pipe(INPUT_REACTIONS, Bytes::new(), msg, ts).unwrap();
}

type Check = fn(&DeadReason) -> bool;

#[test]
fn invalid_messages_go_to_dead_letters_with_their_reason() {
    let mut d = driver();
    let cases: Vec<(Bytes, Check)> = vec![
        (Bytes::from_static(b"not json"), |r| {
            matches!(r, DeadReason::NotJson { .. })
        }),
        (Bytes::from_static(b"[1,2]"), |r| {
            matches!(r, DeadReason::NotAnObject)
        }),
        (
            Bytes::from_static(br#"{"campaign":"c1","batch":0,"user":1,"creative":0,"time_ms":5}"#),
            |r| matches!(r, DeadReason::MissingField { field } if field == "reaction"),
        ),
        (
            Bytes::from_static(
                br#"{"campaign":"c1","batch":0,"user":-1,"creative":0,"reaction":"clicked","time_ms":5}"#,
            ),
            |r| matches!(r, DeadReason::BadField { field, .. } if field == "user"),
        ),
        (reaction("c1", 1, 0, "waved", T0), |r| {
            matches!(r, DeadReason::BadField { field, .. } if field == "reaction")
        }),
        (reaction("nope", 1, 0, "clicked", T0), |r| {
            matches!(r, DeadReason::UnknownCampaign { campaign } if campaign == "nope")
        }),
        (reaction("c1", 1, 0, "clicked", 5), |r| {
            matches!(r, DeadReason::OutsideCampaign { time_ms: 5, .. })
        }),
        (reaction("c1", 1, 7, "clicked", T0), |r| {
            matches!(r, DeadReason::UnknownCreative { creative: 7, creatives: 2 })
        }),
        (reaction("c1", 99, 0, "clicked", T0), |r| {
            matches!(r, DeadReason::UnknownUser { user: 99 })
        }),
    ];
    for (msg, _) in &cases {
        pipe(&mut d, msg.clone(), T0);
    }
    d.pipe(
        INPUT_PROFILES,
        Bytes::new(),
        Bytes::from_static(b"{\"user\":5}"),
        T0,
    )
    .unwrap();
    d.pipe(
        INPUT_PROFILES,
        Bytes::new(),
        profile(6, [0.0, 0.0]).slice(..10),
        T0,
    )
    .unwrap();
    let dead = d
        .read_key_values::<String, Json<DeadLetter>>(DEAD_LETTERS)
        .unwrap();
    assert_eq!(dead.len(), cases.len() + 2, "{dead:#?}");
    // Dead letters of one input come in order; reaction ones first here.
    let reactions: Vec<&DeadLetter> = dead
        .iter()
        .map(|(_, Json(d))| d)
        .filter(|d| d.input == INPUT_REACTIONS)
        .collect();
    for ((msg, check), got) in cases.iter().zip(&reactions) {
        assert!(
            check(&got.reason),
            "{:?} → {:?}",
            String::from_utf8_lossy(msg),
            got.reason
        );
        assert_eq!(got.excerpt.as_bytes(), &msg[..]);
    }
    let profiles: Vec<&DeadLetter> = dead
        .iter()
        .map(|(_, Json(d))| d)
        .filter(|d| d.input == INPUT_PROFILES)
        .collect();
    assert!(
        matches!(&profiles[0].reason, DeadReason::MissingField { field } if field == "features")
    );
    assert!(matches!(profiles[1].reason, DeadReason::NotJson { .. }));
    // Nothing of it was counted.
    d.advance_time(T0 + 10 * 60_000).unwrap();
    assert!(d
        .read_output::<Windowed<String>, Json<ReactionWindow>>(REACTION_WINDOWS)
        .unwrap()
        .is_empty());
}

#[test]
fn closed_windows_count_each_user_once_and_feed_the_models() {
    let mut d = driver();
    // Window [T0, T0+60s): user 1 delivered + clicked twice (creative 0),
    // user 2 delivered (creative 0), user 3 replied without a delivery
    // report (creative 1).
    pipe(&mut d, reaction("c1", 1, 0, "delivered", T0 + 1), T0 + 1);
    pipe(&mut d, reaction("c1", 1, 0, "clicked", T0 + 2), T0 + 2);
    pipe(&mut d, reaction("c1", 1, 0, "clicked", T0 + 3), T0 + 3);
    pipe(&mut d, reaction("c1", 2, 0, "delivered", T0 + 4), T0 + 4);
    pipe(
        &mut d,
        reaction("c1", 3, 1, "replied", T0 + 50_000),
        T0 + 50_000,
    );
    // Within grace: still counted in the first window.
    pipe(
        &mut d,
        reaction("c1", 2, 0, "opened", T0 + 59_000),
        T0 + 65_000,
    );
    assert!(d
        .read_output::<Windowed<String>, Json<ReactionWindow>>(REACTION_WINDOWS)
        .unwrap()
        .is_empty());
    // Stream time passes end + grace: the window closes.
    pipe(
        &mut d,
        reaction("c1", 2, 0, "clicked", T0 + 70_001),
        T0 + 70_001,
    );
    let windows = d
        .read_key_values::<Windowed<String>, Json<ReactionWindow>>(REACTION_WINDOWS)
        .unwrap();
    assert_eq!(windows.len(), 1, "{windows:#?}");
    let (key, Json(w)) = &windows[0];
    assert_eq!((key.key.as_str(), key.window.start_ms), ("c1", T0));
    assert_eq!((w.start_ms, w.end_ms), (T0, T0 + 60_000));
    assert_eq!(w.reactions_per_creative(2), vec![1, 1]);
    let delivered: u32 = w.cells.iter().map(|c| c.delivered).sum();
    assert_eq!(delivered, 3, "each user delivered once: {w:#?}");

    let cmd = w.record_reactions(2);
    assert!(cmd.id.starts_with("reactions:"));
    assert_eq!(
        cmd.action,
        Action::RecordReactions {
            window_start_ms: T0,
            reactions: vec![1, 1]
        }
    );
    assert_eq!(w.record_reactions(2).id, cmd.id, "deterministic id");

    let outcomes = w.outcomes(2).unwrap();
    assert_eq!(outcomes.totals(2), vec![(2, 1), (1, 1)]);
    let mut policy = CreativeThompson::new(2, 100).unwrap();
    policy.update(&outcomes).unwrap();

    // A reaction for the closed window is late.
    pipe(
        &mut d,
        reaction("c1", 4, 1, "delivered", T0 + 10),
        T0 + 70_002,
    );
    let late = d
        .read_output::<String, LateRecord<Json<UserReaction>>>(LATE_REACTIONS)
        .unwrap();
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].key, "c1");
    assert!(late[0].value.reason.to_string().contains("closed"));
    assert_eq!(d.metrics().late_records, 1);

    // Per-user outcomes: first delivery and first reaction of each user.
    let firsts = d
        .read_key_values::<(String, u32), Json<UserReaction>>(USER_OUTCOMES)
        .unwrap();
    let mut view = UserOutcomes::default();
    for ((c, u), Json(r)) in &firsts {
        view.apply(c, *u, r);
    }
    let u1 = view.get("c1", 1).unwrap();
    assert!(u1.delivered && u1.reacted && u1.reacted_at_ms == Some(T0 + 2));
    let u2 = view.get("c1", 2).unwrap();
    assert!(u2.delivered && u2.reacted);
    // User 4 (late for the window) is still in the per-user view.
    assert_eq!(
        view.outcomes("c1", 2).unwrap().totals(2),
        vec![(2, 2), (2, 1)]
    );
}

#[test]
fn the_pipeline_survives_a_restart_between_commits() {
    let mut d = driver();
    pipe(&mut d, reaction("c1", 1, 0, "clicked", T0 + 1), T0 + 1);
    d.commit().unwrap();
    let mut d = d.restart(reaction_topology(config()).unwrap()).unwrap();
    // The duplicate is recognised after the restart, the window continues.
    pipe(&mut d, reaction("c1", 1, 0, "clicked", T0 + 2), T0 + 2);
    pipe(&mut d, reaction("c1", 2, 1, "clicked", T0 + 3), T0 + 3);
    d.advance_time(T0 + 200_000).unwrap();
    let windows = d
        .read_key_values::<Windowed<String>, Json<ReactionWindow>>(REACTION_WINDOWS)
        .unwrap();
    assert_eq!(windows.len(), 1);
    assert_eq!(windows[0].1 .0.reactions_per_creative(2), vec![1, 1]);
}

#[tokio::test]
async fn runner_on_the_log_feeds_the_user_outcome_projection() {
    let log = Arc::new(InMemoryLog::new());
    let append = |kind: &'static str, payloads: Vec<(Bytes, u64)>| {
        let log = log.clone();
        async move {
            let events = payloads
                .into_iter()
                .map(|(p, ts)| NewEvent::new(kind, 1, ts, p))
                .collect();
            log.append(AppendTx::single(
                StreamId::new("inbox").unwrap(),
                ExpectedVersion::Any,
                events,
            ))
            .await
            .unwrap();
        }
    };
    let info_payload = Bytes::from(Json(info()).to_bytes_vec());
    // The campaign info's key is the stream id: put it on stream "c1".
    log.append(AppendTx::single(
        StreamId::new("c1").unwrap(),
        ExpectedVersion::Any,
        vec![NewEvent::new(INPUT_CAMPAIGNS, 1, 0, info_payload)],
    ))
    .await
    .unwrap();
    append(
        INPUT_PROFILES,
        vec![(profile(1, [1.0, 1.0]), 0), (profile(2, [0.0, -1.0]), 0)],
    )
    .await;
    append(
        INPUT_REACTIONS,
        vec![
            (reaction("c1", 1, 0, "delivered", T0), T0),
            (reaction("c1", 1, 0, "clicked", T0 + 5), T0 + 5),
            (reaction("c1", 2, 1, "delivered", T0 + 6), T0 + 6),
            (Bytes::from_static(b"garbage"), T0 + 7),
        ],
    )
    .await;
    let store = Arc::new(InMemoryStore::new());
    let mut runner = StreamRunner::open(
        reaction_topology(config()).unwrap(),
        store,
        EventLogSource::new(log.clone()),
        EventLogSink::new(log.clone()),
        RunnerConfig::new("reactions"),
    )
    .unwrap();
    runner.run_until_idle().await.unwrap();
    let model = InMemoryReadModel::<UserOutcomes>::default();
    ProjectionRunner::new(
        log.clone(),
        user_outcome_projection("user-outcomes", model.clone()),
    )
    .catch_up()
    .await
    .unwrap();
    let view = model.state();
    assert_eq!(view.len(), 2);
    assert!(view.get("c1", 1).unwrap().reacted);
    assert!(!view.get("c1", 2).unwrap().reacted);
    let all = log.read_all(0, 1000).await.unwrap();
    assert_eq!(all.iter().filter(|e| e.kind == DEAD_LETTERS).count(), 1);
}

trait ToBytesVec {
    fn to_bytes_vec(&self) -> Vec<u8>;
}

impl<T: smartmsg_engine::stream::StateCodec> ToBytesVec for T {
    fn to_bytes_vec(&self) -> Vec<u8> {
        self.to_bytes()
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<u64>().prop_map(|n| serde_json::json!(n)),
        any::<f64>().prop_map(|n| serde_json::json!(n)),
        "[a-z]{0,8}".prop_map(serde_json::Value::String),
        prop_oneof![
            Just("clicked"),
            Just("delivered"),
            Just("replied"),
            Just("opened"),
            Just("unsubscribed")
        ]
        .prop_map(|s| serde_json::Value::String(s.into())),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        proptest::collection::vec(inner, 0..4).prop_map(serde_json::Value::Array)
    })
}

const FIELDS: &[&str] = &[
    "campaign", "batch", "user", "creative", "reaction", "time_ms",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn the_parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_reaction(&bytes);
        let _ = parse_profile(&bytes);
        let _ = smartmsg_domain::reactions::parse_profile_change(&bytes);
    }

    #[test]
    fn the_parser_gives_a_typed_reason_for_any_object(
        fields in proptest::collection::vec((proptest::sample::select(FIELDS), json_value()), 0..8)
    ) {
        let obj: serde_json::Map<String, serde_json::Value> =
            fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let bytes = serde_json::to_vec(&obj).unwrap();
        match parse_reaction(&bytes) {
            Ok(m) => {
                // Valid only if every field was present with its type.
                for f in FIELDS {
                    prop_assert!(obj.contains_key(*f));
                }
                prop_assert_eq!(m.campaign.as_str(), obj["campaign"].as_str().unwrap());
            }
            Err(DeadReason::MissingField { field }) => {
                prop_assert!(obj.get(&field).is_none_or(|v| v.is_null()));
            }
            Err(DeadReason::BadField { field, .. }) => prop_assert!(obj.contains_key(&field)),
            Err(other) => prop_assert!(false, "unexpected reason {other:?}"),
        }
    }

    #[test]
    fn valid_messages_round_trip(
        campaign in "[a-z0-9-]{1,20}",
        batch in any::<u32>(),
        user in any::<u32>(),
        creative in any::<u16>(),
        kind in proptest::sample::select(vec![
            ReactionKind::Delivered, ReactionKind::Opened, ReactionKind::Clicked,
            ReactionKind::Replied, ReactionKind::Unsubscribed,
        ]),
        time_ms in any::<u64>(),
    ) {
        let m = smartmsg_domain::reactions::ReactionMessage {
            campaign, batch, user, creative, reaction: kind, time_ms,
        };
        let bytes = serde_json::to_vec(&m).unwrap();
        prop_assert_eq!(parse_reaction(&bytes).unwrap(), m);
    }
}

#[test]
fn a_closed_window_becomes_a_command_the_campaign_accepts_once() {
    use smartmsg_domain::synthetic::InMemoryCampaign;
    use smartmsg_domain::{BatchSchedule, BatchSizing, CampaignSpec, Decisions};

    let spec = CampaignSpec {
        channel: "ch".into(),
        audience: "all".into(),
        creatives: vec!["a".into(), "b".into()],
        budget: 4,
        schedule: BatchSchedule {
            start_ms: 1_000_000,
            interval_ms: 60_000,
            sizing: BatchSizing::Count(1),
        },
    };
    let mut c = InMemoryCampaign::default();
    c.execute("create", Action::Create(spec.clone()), 0)
        .unwrap();
    c.execute("start", Action::Start, 1_000_000).unwrap();
    let mut decisions = Decisions::with_capacity(4);
    for (u, cr) in [(1, 0), (2, 0), (3, 1), (4, 1)] {
        decisions.push(u, cr, 0.5);
    }
    c.execute(
        "plan-0",
        Action::PlanBatch {
            batch: 0,
            policy: "test".into(),
            decisions,
        },
        1_000_000,
    )
    .unwrap();
    c.execute("sent-0", Action::RecordBatchSent { batch: 0 }, 1_000_000)
        .unwrap();

    // The pipeline, with the campaign's info derived from its spec.
    let mut d = TestDriver::new(reaction_topology(config()).unwrap()).unwrap();
    d.pipe(
        INPUT_CAMPAIGNS,
        "c1".to_string(),
        Json(CampaignInfo::from_spec(&spec, 3_600_000)),
        0,
    )
    .unwrap();
    for (u, x) in [
        (1, [1.0, 0.0]),
        (2, [-1.0, 0.0]),
        (3, [0.0, 2.0]),
        (4, [0.0, 0.0]),
    ] {
        d.pipe(INPUT_PROFILES, Bytes::new(), profile(u, x), 0)
            .unwrap();
    }
    pipe(&mut d, reaction("c1", 1, 0, "clicked", T0 + 1), T0 + 1);
    pipe(&mut d, reaction("c1", 3, 1, "replied", T0 + 2), T0 + 2);
    pipe(&mut d, reaction("c1", 4, 1, "replied", T0 + 3), T0 + 3);
    d.advance_time(T0 + 200_000).unwrap();
    let windows = d
        .read_key_values::<Windowed<String>, Json<ReactionWindow>>(REACTION_WINDOWS)
        .unwrap();
    let cmd = windows[0].1 .0.record_reactions(2);
    assert_eq!(
        c.execute(&cmd.id, cmd.action.clone(), T0 + 200_000)
            .unwrap(),
        1
    );
    // Delivered again (a retry after a crash): recorded once.
    assert_eq!(c.execute(&cmd.id, cmd.action, T0 + 200_000).unwrap(), 0);
    let stats = c.state.creative_stats();
    assert_eq!((stats[0].reactions, stats[1].reactions), (1, 2));
}

#[test]
fn a_removed_profile_leaves_the_user_table() {
    use smartmsg_domain::reactions::{parse_profile_change, profile_removal, ProfileChange};
    assert_eq!(
        parse_profile_change(&profile_removal(3)).unwrap(),
        ProfileChange::Remove(3)
    );
    assert!(matches!(
        parse_profile_change(&profile(3, [0.0, 1.0])).unwrap(),
        ProfileChange::Set(p) if p.user == 3
    ));
    let mut d = driver();
    d.pipe(INPUT_PROFILES, Bytes::new(), profile_removal(3), T0)
        .unwrap();
    d.pipe(
        INPUT_PROFILES,
        Bytes::from_static(b""),
        Bytes::from_static(br#"{"user":4,"removed":false}"#),
        T0,
    )
    .unwrap();
    pipe(&mut d, reaction("c1", 3, 0, "clicked", T0), T0);
    pipe(&mut d, reaction("c1", 4, 1, "clicked", T0), T0);
    let dead = d
        .read_key_values::<String, Json<DeadLetter>>(DEAD_LETTERS)
        .unwrap();
    let reasons: Vec<&DeadReason> = dead.iter().map(|(_, Json(d))| &d.reason).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        matches!(reasons[0], DeadReason::BadField { field, .. } if field == "removed"),
        "{reasons:?}"
    );
    assert!(
        matches!(reasons[1], DeadReason::UnknownUser { user: 3 }),
        "{reasons:?}"
    );
    // User 4 (not removed) still counts.
    d.advance_time(T0 + 10 * 60_000).unwrap();
    let windows = d
        .read_key_values::<Windowed<String>, Json<ReactionWindow>>(REACTION_WINDOWS)
        .unwrap();
    let total: u64 = windows
        .iter()
        .map(|(_, Json(w))| w.cells.iter().map(|c| u64::from(c.reacted)).sum::<u64>())
        .sum();
    assert_eq!(total, 1);
}
