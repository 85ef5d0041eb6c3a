//! A cluster of two nodes on the embedded backend: campaigns routed to
//! their shards, shards moved from one node to the other mid-campaign,
//! every campaign completing with each batch planned and sent once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rand::SeedableRng;
use smartmsg_domain::synthetic::{Population, ResponseTruth};
use smartmsg_domain::{
    BatchSchedule, BatchSizing, CampaignSpec, OutgoingBatch, PolicySpec, Status,
};
use smartmsg_embedded::EmbeddedConfig;
use smartmsg_engine::ManualClock;
use smartmsg_service::cluster::{
    ClusterError, ManualOwnership, Node, NodeHandle, NodeOptions, OpenError, ShardMap, ShardOpener,
    ShardParts,
};
use smartmsg_service::{embedded_ports, CampaignSetup, RuntimeOptions, SendError, Sender};

const START: u64 = 1_700_000_000_000;
const HOUR: u64 = 3_600_000;
const WAIT: Duration = Duration::from_secs(60);

/// Counts every batch handed to it, by (campaign, batch).
#[derive(Default)]
struct Counting {
    sent: Mutex<BTreeMap<(String, u32), u32>>,
}

#[async_trait]
impl Sender for Counting {
    fn name(&self) -> &str {
        "counting"
    }
    async fn send(&self, batch: &OutgoingBatch) -> Result<(), SendError> {
        *self
            .sent
            .lock()
            .unwrap()
            .entry((batch.campaign.clone(), batch.batch))
            .or_default() += 1;
        Ok(())
    }
}

/// Each shard in its own data directory; the directory's lock keeps a
/// second node out until the first has closed it.
struct Dirs {
    root: std::path::PathBuf,
    clock: ManualClock,
    sender: Arc<Counting>,
}

#[async_trait]
impl ShardOpener for Dirs {
    async fn open(&self, shard: u32) -> Result<ShardParts, OpenError> {
        let mut options = RuntimeOptions::default();
        options.poll_interval_ms = 20;
        let ports = embedded_ports(
            &self.root.join(format!("shard-{shard}")),
            EmbeddedConfig::default(),
            Arc::new(self.clock.clone()),
            self.sender.clone(),
        )?;
        Ok(ShardParts::new(ports, options))
    }
}

fn setup(id: &str, pop: &Population) -> CampaignSetup {
    let spec = CampaignSpec {
        channel: "test-channel".into(),
        audience: "pop".into(),
        creatives: vec!["red".into(), "blue".into()],
        budget: 300,
        schedule: BatchSchedule {
            start_ms: START,
            interval_ms: HOUR,
            sizing: BatchSizing::Count(3),
        },
    };
    let mut s = CampaignSetup::new(
        id,
        spec,
        pop.candidates.clone(),
        PolicySpec::Integrated {
            model: {
                let mut m = smartmsg_domain::ModelConfig::default();
                m.propensity_draws = 4;
                m
            },
        },
    );
    s.reaction_horizon_ms = HOUR;
    s
}

/// Waits until every campaign's view (from whichever node runs its shard)
/// satisfies `ok`.
async fn wait_views(
    nodes: &[&NodeHandle],
    ids: &[String],
    what: &str,
    ok: impl Fn(&smartmsg_service::CampaignView) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let done = ids.iter().all(|id| {
            nodes
                .iter()
                .find_map(|n| n.published(id))
                .is_some_and(|v| ok(&v))
        });
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_move_between_nodes_mid_campaign_and_every_campaign_completes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START - 1_000);
    let sender = Arc::new(Counting::default());
    let map = ShardMap::new(4).unwrap();
    let opener = Arc::new(Dirs {
        root: dir.path().to_owned(),
        clock: clock.clone(),
        sender: sender.clone(),
    });
    let own_a = Arc::new(ManualOwnership::new());
    let own_b = Arc::new(ManualOwnership::new());
    let mut options = NodeOptions::default();
    options.retry = Duration::from_millis(50);
    let node_a = Node::new(map, own_a.clone(), opener.clone(), options.clone());
    let node_b = Node::new(map, own_b.clone(), opener.clone(), options);
    let (a, b) = (node_a.handle(), node_b.handle());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let run_a = tokio::spawn(node_a.run(stopped(stop_rx.clone())));
    let run_b = tokio::spawn(node_b.run(stopped(stop_rx)));

    // A owns every shard at first.
    own_a.set(map.all());
    assert!(a.wait_running(WAIT, |r| r.len() == 4).await);
    let pop = Population::generate(
        2_000,
        ResponseTruth::segmented(2, 3, 0.2, 1.5),
        &mut rand_chacha::ChaCha8Rng::seed_from_u64(3),
    )
    .unwrap();
    let ids: Vec<String> = (0..8).map(|i| format!("campaign-{i}")).collect();
    let shards: BTreeSet<u32> = ids.iter().map(|id| map.shard_of(id)).collect();
    assert!(
        shards.len() >= 3,
        "the ids should spread over the shards: {shards:?}"
    );
    for id in &ids {
        a.create_campaign(setup(id, &pop)).await.unwrap();
        a.start(id).await.unwrap();
    }
    // B owns nothing: it routes nowhere.
    assert!(matches!(
        b.create_campaign(setup("elsewhere", &pop)).await,
        Err(ClusterError::NotOwned { .. })
    ));

    clock.set(START);
    wait_views(&[&a], &ids, "batch 0 is sent", |v| {
        v.batches.iter().any(|b| b.sent_ms.is_some())
    })
    .await;

    // Shards 2 and 3 move to B: A releases them before B opens them.
    let g = own_a.set([0, 1]);
    assert!(own_a.wait_released(g, WAIT).await);
    assert_eq!(a.running(), BTreeSet::from([0, 1]));
    own_b.set([2, 3]);
    assert!(b.wait_running(WAIT, |r| r.len() == 2).await);
    for id in &ids {
        let owner_is_b = map.shard_of(id) >= 2;
        assert_eq!(b.runtime_for(id).is_ok(), owner_is_b, "{id}");
        assert_eq!(a.runtime_for(id).is_ok(), !owner_is_b, "{id}");
    }

    for h in 1..=4 {
        clock.set(START + h * HOUR);
        let sent = (h as usize + 1).min(3);
        wait_views(&[&a, &b], &ids, "the next batch is sent", |v| {
            v.batches.iter().filter(|b| b.sent_ms.is_some()).count() >= sent
        })
        .await;
    }
    clock.set(START + 6 * HOUR);
    wait_views(&[&a, &b], &ids, "every campaign completed", |v| {
        v.status == Some(Status::Completed)
    })
    .await;

    let _ = stop_tx.send(true);
    run_a.await.unwrap();
    run_b.await.unwrap();

    // Each batch of each campaign was handed to the sender exactly once,
    // across the move.
    let sent = sender.sent.lock().unwrap().clone();
    for id in &ids {
        for batch in 0..3 {
            assert_eq!(
                sent.get(&(id.clone(), batch)),
                Some(&1),
                "{id} batch {batch}"
            );
        }
    }
    assert_eq!(sent.len(), ids.len() * 3);
}
