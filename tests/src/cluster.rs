//! Shared by the cluster tests and their child process (`cluster_node`):
//! the campaigns, the child's configuration and the status it reports.

use serde::{Deserialize, Serialize};
use smartmsg_domain::{BatchSchedule, BatchSizing, CampaignSpec, Candidates, PolicySpec};
use smartmsg_service::{CampaignSetup, CampaignView, PipelineSettings};

/// Messages each test campaign sends.
pub const BUDGET: u64 = 120;

/// A test campaign: 400 users with two features, two creatives, 4 batches
/// `interval_ms` apart from `start_ms`, one-second reaction windows.
pub fn setup(id: &str, start_ms: u64, interval_ms: u64) -> CampaignSetup {
    let mut audience = Candidates::new(2).expect("two features");
    for u in 0..400u32 {
        let x = [((u % 7) as f32 - 3.0) / 3.0, ((u % 5) as f32 - 2.0) / 2.0];
        audience.push(u, &x).expect("a row");
    }
    let spec = CampaignSpec {
        channel: "kafka".into(),
        audience: "cluster".into(),
        creatives: vec!["a".into(), "b".into()],
        budget: BUDGET,
        schedule: BatchSchedule {
            start_ms,
            interval_ms,
            sizing: BatchSizing::Count(4),
        },
    };
    let mut s = CampaignSetup::new(
        id,
        spec,
        audience,
        PolicySpec::CreativeThompson {
            propensity_draws: 50,
        },
    );
    s.pipeline = {
        let mut v = PipelineSettings::default();
        v.window_ms = 200;
        v.grace_ms = 100;
        v
    };
    s.reaction_horizon_ms = interval_ms;
    s
}

/// What a `cluster_node` child runs, passed as JSON in its one argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeArgs {
    /// Kafka bootstrap servers.
    pub bootstrap: String,
    /// RabbitMQ URL.
    pub amqp: String,
    /// The cluster's name.
    pub cluster: String,
    /// Its shards.
    pub shards: u32,
    /// This member's name.
    pub member: String,
    /// Where batches are sent (a Kafka topic).
    pub sent_topic: String,
    /// Where reactions come from (one partition per shard).
    pub reactions_topic: String,
    /// Prefix of the shards' RabbitMQ queues.
    pub queue_prefix: String,
    /// The campaigns to run (created when their shard runs here and they
    /// do not exist yet).
    pub campaigns: Vec<String>,
    /// Their first batch's time.
    pub start_ms: u64,
    /// Between their batches.
    pub interval_ms: u64,
    /// Where to write [`NodeStatus`] (replaced atomically every 100 ms).
    pub status: std::path::PathBuf,
}

/// What a `cluster_node` child reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The member.
    pub member: String,
    /// The shards whose runtimes run in it.
    pub running: Vec<u32>,
    /// The views of the campaigns of those shards.
    pub views: Vec<CampaignView>,
}
