//! Shard ownership through Kafka's consumer-group protocol, on the test
//! script's broker: members split the shards, a new member takes some
//! over, a member that leaves hands its shards to the others.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use smartmsg_kafka::{KafkaShardOwnership, OwnershipConfig, OwnershipError};
use smartmsg_service::cluster::{ShardMap, ShardOwnership};

const WAIT: Duration = Duration::from_secs(90);

/// Joins and follows the ownership as a node would: every change is
/// released at once.
async fn member(
    bootstrap: &str,
    cluster: &str,
    map: ShardMap,
    name: &str,
) -> Arc<KafkaShardOwnership> {
    let mut config = OwnershipConfig::new(bootstrap, cluster, map);
    config.member = name.into();

    let own = Arc::new(KafkaShardOwnership::join(config).await.expect("join"));
    // Weak: dropping the member must drop its membership.
    let follow = Arc::downgrade(&own);
    let mut rx = own.watch();
    tokio::spawn(async move {
        loop {
            let g = rx.borrow_and_update().generation;
            match follow.upgrade() {
                Some(own) => own.released(g),
                None => return,
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    own
}

/// Waits until the members' shards are disjoint, cover every shard and
/// each member has at least one; returns them.
async fn wait_split(members: &[&Arc<KafkaShardOwnership>], map: ShardMap) -> Vec<BTreeSet<u32>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let sets: Vec<BTreeSet<u32>> = members
            .iter()
            .map(|m| m.watch().borrow().shards.clone())
            .collect();
        let total: usize = sets.iter().map(BTreeSet::len).sum();
        let union: BTreeSet<u32> = sets.iter().flatten().copied().collect();
        if total == map.shards() as usize
            && union.len() == total
            && sets.iter().all(|s| !s.is_empty())
        {
            return sets;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the shards were not split among {} members: {sets:?}",
            members.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_split_the_shards_and_take_over_from_one_that_leaves() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let cluster = common::unique_log("own");
    let map = ShardMap::new(6).unwrap();
    let a = member(&bootstrap, &cluster, map, "a").await;
    let b = member(&bootstrap, &cluster, map, "b").await;
    let first = wait_split(&[&a, &b], map).await;
    eprintln!("two members: {first:?}");

    let c = member(&bootstrap, &cluster, map, "c").await;
    let second = wait_split(&[&a, &b, &c], map).await;
    eprintln!("three members: {second:?}");
    // cooperative-sticky: a member keeps the shards it had unless they move
    // to the newcomer.
    for (before, after) in first.iter().zip(&second) {
        assert!(after.is_subset(before), "{before:?} -> {after:?}");
    }

    drop(b);
    let third = wait_split(&[&a, &c], map).await;
    eprintln!("after b left: {third:?}");
    assert!(second[0].is_subset(&third[0]) && second[2].is_subset(&third[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_another_shard_count_is_refused() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let cluster = common::unique_log("own-count");
    let _a = member(&bootstrap, &cluster, ShardMap::new(3).unwrap(), "a").await;
    let refused = KafkaShardOwnership::join(OwnershipConfig::new(
        &bootstrap,
        &cluster,
        ShardMap::new(4).unwrap(),
    ))
    .await;
    assert!(
        matches!(
            refused,
            Err(OwnershipError::ShardCount {
                found: 3,
                expected: 4,
                ..
            })
        ),
        "{refused:?}"
    );
}
