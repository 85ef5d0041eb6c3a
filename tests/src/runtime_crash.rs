//! The contract between the runtime crash test and its child: the
//! campaigns the child runs, where it keeps its status, and which users
//! react.

use rand::{Rng, SeedableRng};
use smartmsg_domain::{
    BatchSchedule, BatchSizing, CampaignSpec, Candidates, ModelConfig, PolicySpec,
};
use smartmsg_service::{CampaignSetup, PipelineSettings};

/// The campaigns: (id, policy).
pub const CAMPAIGNS: [&str; 2] = ["crash-a", "crash-b"];
/// Users per audience.
pub const USERS: u32 = 2_000;
/// Budget per campaign.
pub const BUDGET: u64 = 400;
/// Batches per campaign.
pub const BATCHES: u32 = 8;
/// Between batches (ms of the wall clock).
pub const INTERVAL_MS: u64 = 1_200;
/// The file the child writes its campaigns' views to (JSON, atomically).
pub const STATUS: &str = "status.json";

/// The setup of campaign `i`, starting at `start_ms`.
pub fn setup(i: usize, start_ms: u64) -> CampaignSetup {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
    let mut audience = Candidates::new(3).unwrap_or_else(|_| unreachable!());
    for u in 0..USERS {
        let x = [(); 3].map(|()| rng.random_range(-1.0f32..1.0));
        let _ = audience.push(u, &x);
    }
    let spec = CampaignSpec {
        channel: "crash".into(),
        audience: "crash".into(),
        creatives: vec!["a".into(), "b".into(), "c".into()],
        budget: BUDGET,
        schedule: BatchSchedule {
            start_ms,
            interval_ms: INTERVAL_MS,
            sizing: BatchSizing::Count(BATCHES),
        },
    };
    let policy = if i == 0 {
        PolicySpec::Integrated {
            model: {
                let mut v = ModelConfig::default();
                v.propensity_draws = 10;
                v.random_first_batch = true;
                v
            },
        }
    } else {
        PolicySpec::CreativeThompson {
            propensity_draws: 100,
        }
    };
    let mut s = CampaignSetup::new(CAMPAIGNS[i], spec, audience, policy);
    s.seed = 9 + i as u64;
    s.pipeline = {
        let mut v = PipelineSettings::default();
        v.window_ms = 100;
        v.grace_ms = 50;
        v
    };
    s.reaction_horizon_ms = 500;
    s
}

/// Whether `user` reacts to the message it got (a fixed share, the same
/// whatever batch or restart).
pub fn reacts(user: u32) -> bool {
    user.wrapping_mul(2_654_435_761).is_multiple_of(4)
}
