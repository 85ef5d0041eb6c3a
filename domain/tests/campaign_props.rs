//! Property tests: random command sequences (with retries, reused ids,
//! bad batches and time jumps) against the campaign aggregate; after every
//! step the invariants must hold, and the events must replay (through the
//! codec) to the same state.

use std::collections::BTreeSet;

use proptest::prelude::*;
use smartmsg_domain::{
    Action, BatchSchedule, BatchSizing, Campaign, CampaignCommand, CampaignEvent, CampaignSpec,
    Decisions, Status,
};
use smartmsg_engine::{Aggregate, DecideCtx, EventCodec, StreamId};

const START: u64 = 1_000;
const INTERVAL: u64 = 100;

#[derive(Debug, Clone)]
enum Op {
    Start,
    Pause,
    Resume,
    Cancel,
    Complete,
    /// Plan the next batch (or `batch_offset` past it) with `n` users, fresh
    /// ones or possibly messaged ones.
    Plan {
        /// `None`: the batch's full allowance.
        n: Option<usize>,
        fresh: bool,
        batch_offset: u32,
        creative_seed: u16,
    },
    /// Send the pending batch, or another.
    Send {
        any: Option<u32>,
    },
    Reactions {
        r: Vec<u32>,
    },
    /// Repeat an earlier command (same id, same action).
    Retry {
        index: usize,
    },
    /// Reuse an earlier id with a different action.
    Reuse {
        index: usize,
    },
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Start),
        3 => Just(Op::Pause),
        3 => Just(Op::Resume),
        1 => Just(Op::Cancel),
        1 => Just(Op::Complete),
        18 => (prop::option::weighted(0.6, 0usize..7), any::<bool>(), prop_oneof![4 => Just(0u32), 1 => 0u32..3], any::<u16>())
            .prop_map(|(n, fresh, batch_offset, creative_seed)| Op::Plan { n, fresh, batch_offset, creative_seed }),
        15 => prop::option::weighted(0.2, 0u32..5).prop_map(|any| Op::Send { any }),
        6 => prop::collection::vec(0u32..3, 3).prop_map(|r| Op::Reactions { r }),
        6 => (0usize..1000).prop_map(|index| Op::Retry { index }),
        3 => (0usize..1000).prop_map(|index| Op::Reuse { index }),
        9 => (0u64..250).prop_map(|ms| Op::Advance { ms }),
    ]
}

fn spec(budget: u64, sizing: BatchSizing) -> CampaignSpec {
    CampaignSpec {
        channel: "ch".into(),
        audience: "aud".into(),
        creatives: vec!["a".into(), "b".into(), "c".into()],
        budget,
        schedule: BatchSchedule {
            start_ms: START,
            interval_ms: INTERVAL,
            sizing,
        },
    }
}

struct Harness {
    state: Campaign,
    events: Vec<CampaignEvent>,
    accepted: Vec<CampaignCommand>,
    now: u64,
    next_id: usize,
    fresh_user: u32,
    /// Users seen in any BatchPlanned event, to check no user twice.
    planned_users: BTreeSet<u32>,
}

impl Harness {
    fn run(&mut self, command: CampaignCommand) -> Result<Vec<CampaignEvent>, String> {
        let ctx = DecideCtx {
            stream: StreamId::new("c-1").unwrap(),
            version: self.events.len() as u64,
            now_ms: self.now,
        };
        let status_before = self.state.status();
        match self.state.decide(&command, &ctx) {
            Ok(events) => {
                for e in &events {
                    match e {
                        CampaignEvent::BatchPlanned { decisions, .. } => {
                            if status_before != Some(Status::Running) {
                                return Err(format!("planned while {status_before:?}"));
                            }
                            for &u in &decisions.users {
                                if !self.planned_users.insert(u) {
                                    return Err(format!("user {u} planned twice"));
                                }
                            }
                        }
                        CampaignEvent::BatchSent { .. }
                            if status_before != Some(Status::Running) =>
                        {
                            return Err(format!("sent while {status_before:?}"));
                        }
                        _ => {}
                    }
                    self.state.evolve(e);
                }
                if !events.is_empty() {
                    self.accepted.push(command);
                }
                self.events.extend(events.iter().cloned());
                Ok(events)
            }
            Err(_) => Ok(Vec::new()),
        }
    }

    fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        format!("cmd-{}", self.next_id)
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        let action = match op {
            Op::Start => Action::Start,
            Op::Pause => Action::Pause,
            Op::Resume => Action::Resume,
            Op::Cancel => Action::Cancel { reason: "r".into() },
            Op::Complete => Action::Complete,
            Op::Plan {
                n,
                fresh,
                batch_offset,
                creative_seed,
            } => {
                let batch = self.state.batches().len() as u32 + batch_offset;
                let n = n.unwrap_or(self.state.batch_allowance(batch) as usize);
                let mut d = Decisions::with_capacity(n);
                for i in 0..n {
                    let user = if *fresh {
                        self.fresh_user += 1;
                        self.fresh_user
                    } else {
                        (u32::from(*creative_seed) + i as u32 * 7) % 12
                    };
                    d.push(user, (creative_seed.wrapping_add(i as u16)) % 3, 0.5);
                }
                Action::PlanBatch {
                    batch,
                    policy: "prop".into(),
                    decisions: d,
                }
            }
            Op::Send { any } => Action::RecordBatchSent {
                batch: any.or(self.state.pending_batch()).unwrap_or(0),
            },
            Op::Reactions { r } => Action::RecordReactions {
                window_start_ms: self.now,
                reactions: r.clone(),
            },
            Op::Retry { index } => {
                if self.accepted.is_empty() {
                    return Ok(());
                }
                let c = self.accepted[index % self.accepted.len()].clone();
                let before = self.state.clone();
                let events = self.run(c.clone())?;
                if !events.is_empty() || self.state != before {
                    return Err(format!("retry of {c:?} produced {events:?}"));
                }
                return Ok(());
            }
            Op::Reuse { index } => {
                if self.accepted.is_empty() {
                    return Ok(());
                }
                let c = self.accepted[index % self.accepted.len()].clone();
                let other = if matches!(c.action, Action::Pause) {
                    Action::Resume
                } else {
                    Action::Pause
                };
                let ctx = DecideCtx {
                    stream: StreamId::new("c-1").unwrap(),
                    version: self.events.len() as u64,
                    now_ms: self.now,
                };
                let r = self
                    .state
                    .decide(&CampaignCommand::new(c.id.clone(), other), &ctx);
                if !matches!(
                    r,
                    Err(smartmsg_domain::CampaignError::CommandIdReused { .. })
                ) {
                    return Err(format!("reused id {} gave {r:?}", c.id));
                }
                return Ok(());
            }
            Op::Advance { ms } => {
                self.now += ms;
                return Ok(());
            }
        };
        let id = self.fresh_id();
        self.run(CampaignCommand::new(id, action)).map(|_| ())
    }

    fn check_invariants(&self) -> Result<(), String> {
        let s = &self.state;
        let spec = s.spec().ok_or("no spec")?;
        let budget = spec.budget;
        if s.reserved() > budget {
            return Err(format!("reserved {} > budget {budget}", s.reserved()));
        }
        if s.messaged().len() as u64 != s.reserved() {
            return Err(format!(
                "{} users messaged but {} reserved",
                s.messaged().len(),
                s.reserved()
            ));
        }
        if !s.messaged().iter().eq(self.planned_users.iter().copied()) {
            return Err("messaged set differs from the planned users".into());
        }
        if s.sent() > s.reserved() {
            return Err("sent more than reserved".into());
        }
        if s.batches().len() as u32 > spec.batch_count() {
            return Err("more batches than planned".into());
        }
        let unsent = s.batches().iter().filter(|b| !b.sent).count();
        if unsent > 1 || (unsent == 1 && s.pending_batch().is_none()) {
            return Err("more than one batch in flight".into());
        }
        let mut total = 0u64;
        for (i, b) in s.batches().iter().enumerate() {
            if u64::from(b.users) > spec.nominal_batch_size(i as u32) {
                return Err(format!("batch {i} larger than planned"));
            }
            total += u64::from(b.users);
        }
        if total != s.reserved() {
            return Err("batch sizes do not add up".into());
        }
        for (c, st) in s.creative_stats().iter().enumerate() {
            if st.reactions > st.sent || st.sent > st.planned {
                return Err(format!("creative {c}: {st:?}"));
            }
        }
        // Replay through the codec gives the same state; so does a snapshot.
        let mut replayed = Campaign::default();
        for e in &self.events {
            let back = CampaignEvent::decode(e.kind(), e.schema(), &e.encode())
                .map_err(|err| format!("decode: {err}"))?;
            if &back != e {
                return Err(format!("codec changed {e:?}"));
            }
            replayed.evolve(&back);
        }
        if &replayed != s {
            return Err("replay differs".into());
        }
        let snap = Campaign::decode_snapshot(&s.encode_snapshot().ok_or("no snapshot")?)
            .ok_or("snapshot does not decode")?;
        if &snap != s {
            return Err("snapshot differs".into());
        }
        Ok(())
    }
}

#[test]
fn random_command_sequences_keep_the_invariants() {
    use proptest::test_runner::{Config, TestRunner};
    use std::cell::Cell;
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    let sizing = prop_oneof![
        (1u32..6).prop_map(BatchSizing::Count),
        (1u32..8).prop_map(BatchSizing::Size)
    ];
    let (with_sent, terminal, exhausted) = (Cell::new(0), Cell::new(0), Cell::new(0));
    let strategy = (1u64..20, sizing, prop::collection::vec(op(), 1..80));
    runner
        .run(&strategy, |(budget, sizing, ops)| {
            let spec = spec(budget, sizing);
            prop_assume!(spec.validate().is_ok());
            let mut h = Harness {
                state: Campaign::default(),
                events: Vec::new(),
                accepted: Vec::new(),
                now: START - 50,
                next_id: 0,
                fresh_user: 100,
                planned_users: BTreeSet::new(),
            };
            h.run(CampaignCommand::new("create", Action::Create(spec)))
                .unwrap();
            for op in &ops {
                h.apply(op)
                    .map_err(|e| TestCaseError::fail(format!("{op:?}: {e}")))?;
                h.check_invariants()
                    .map_err(|e| TestCaseError::fail(format!("after {op:?}: {e}")))?;
            }
            with_sent.set(with_sent.get() + usize::from(h.state.sent() > 0));
            terminal.set(terminal.get() + usize::from(!h.state.status().unwrap().is_live()));
            exhausted.set(exhausted.get() + usize::from(h.state.remaining_budget() == 0));
            Ok(())
        })
        .unwrap();
    // The random sequences reach the interesting states.
    let (s, t, e) = (with_sent.get(), terminal.get(), exhausted.get());
    eprintln!("cases with a sent batch: {s}, terminal: {t}, budget exhausted: {e}");
    assert!(s > 50 && t > 50 && e > 10, "{s} {t} {e}");
}
