//! The [`SnapshotStore`] conformance suite.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::select;

use super::{finish, run_check, run_random_cases, runtime, SuiteConfig};
use crate::error::SnapshotError;
use crate::snapshot::{Snapshot, SnapshotStore};
use crate::stream_id::StreamId;

/// Makes the snapshot stores the suite checks.
///
/// An in-memory store implements [`SnapshotHarness::create`] only; a durable
/// one also implements [`SnapshotHarness::reopen`].
#[async_trait]
pub trait SnapshotHarness: Send {
    /// The store under test.
    type Store: SnapshotStore + 'static;

    /// A fresh, empty store.
    async fn create(&mut self) -> Self::Store;

    /// Close `store` (drop it) and open the same store again; durable
    /// backends must then show every snapshot saved before. The default
    /// returns `store` unchanged (in-memory).
    async fn reopen(&mut self, store: Self::Store) -> Self::Store {
        store
    }
}

/// Runs the [`SnapshotStore`] conformance suite against the stores `harness`
/// makes, and panics with a report if any check fails.
///
/// Checks:
///
/// - **random operation sequences** (`config.cases` of them, up to
///   `config.max_ops` long) of `save`, `load`, `delete` and reopening over a
///   few streams, compared with a model: the snapshot with the highest
///   version wins, an older save is ignored, a deleted or never-saved stream
///   loads as `None`, and everything survives a reopen. A save at the same
///   version as the kept snapshot may either replace it or be ignored (the
///   port does not say), but later loads must then agree with the first;
/// - **racing saves**: `config.concurrency` tasks saving interleaved versions
///   of one stream; the highest version must be what remains.
///
/// # Panics
///
/// When a check fails, with a report naming the seed and the minimal failing
/// operation sequence. Also when called from inside a tokio runtime: call it
/// from a plain `#[test]`.
pub fn snapshot_store_conformance<H: SnapshotHarness>(harness: H, config: SuiteConfig) {
    let rt = runtime("snapshot_store_conformance");
    let seed = config.resolve_seed();
    let mut harness = harness;
    let mut failures = Vec::new();
    failures.extend(
        run_check(
            &rt,
            "racing saves keep the highest version",
            config.timeout,
            check_racing_saves(&mut harness, &config),
        )
        .err(),
    );
    failures.extend(
        run_check(
            &rt,
            "a large state round-trips",
            config.timeout,
            check_large_state(&mut harness),
        )
        .err(),
    );
    if let Err(e) = run_random_cases(&rt, harness, &config, seed, op(), |h, ops| {
        Box::pin(run_case(h, ops))
    }) {
        failures.push(e);
    }
    finish("SnapshotStore", seed, failures);
}

const STREAMS: &[&str] = &["snap-0", "snap-1", "agg:2/x"];

#[derive(Debug, Clone)]
enum Op {
    Save(Snapshot),
    Load(StreamId),
    Delete(StreamId),
    Reopen,
}

fn stream_id() -> impl Strategy<Value = StreamId> {
    select(STREAMS).prop_map(|s| StreamId::new(s).expect("valid pool name"))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (
            stream_id(),
            prop_oneof![6 => 0u64..8, 1 => Just(u64::MAX)],
            prop_oneof![3 => 0u16..3, 1 => Just(u16::MAX)],
            proptest::collection::vec(any::<u8>(), 0..32),
        )
            .prop_map(|(stream, version, schema, state)| Op::Save(Snapshot {
                stream,
                version,
                schema,
                state: Bytes::from(state),
            })),
        5 => stream_id().prop_map(Op::Load),
        2 => stream_id().prop_map(Op::Delete),
        1 => Just(Op::Reopen),
    ]
}

/// The reference store: per stream, every snapshot the store may hold (all
/// of one version; more than one only after saves at an equal version).
#[derive(Debug, Default)]
struct Model {
    kept: BTreeMap<StreamId, Vec<Snapshot>>,
}

impl Model {
    fn save(&mut self, s: Snapshot) {
        match self.kept.get_mut(&s.stream) {
            Some(kept) if kept[0].version > s.version => {}
            Some(kept) if kept[0].version == s.version => kept.push(s),
            _ => {
                self.kept.insert(s.stream.clone(), vec![s]);
            }
        }
    }

    /// Checks a load against the model and settles any open choice.
    fn load(&mut self, stream: &StreamId, got: &Option<Snapshot>) -> Result<(), String> {
        match (self.kept.get_mut(stream), got) {
            (None, None) => Ok(()),
            (None, Some(g)) => Err(format!("load({stream}) returned {g:?}; expected None")),
            (Some(kept), None) => Err(format!(
                "load({stream}) returned None; expected {:?}",
                kept[0]
            )),
            (Some(kept), Some(g)) => {
                ensure!(
                    kept.contains(g),
                    "load({stream}) returned {g:?}; expected {}",
                    if kept.len() == 1 {
                        format!("{:?}", kept[0])
                    } else {
                        format!("one of {kept:?}")
                    }
                );
                *kept = vec![g.clone()];
                Ok(())
            }
        }
    }
}

async fn run_case<H: SnapshotHarness>(harness: &mut H, ops: &[Op]) -> Result<(), String> {
    let mut store = harness.create().await;
    let mut model = Model::default();
    for (i, op) in ops.iter().enumerate() {
        let at = |e: String| format!("at op #{i} {op:?}:\n  {e}");
        match op {
            Op::Save(s) => {
                store
                    .save(s.clone())
                    .await
                    .map_err(|e| at(format!("save failed: {e:?}")))?;
                model.save(s.clone());
            }
            Op::Load(stream) => {
                let got = store
                    .load(stream)
                    .await
                    .map_err(|e| at(format!("load failed: {e:?}")))?;
                model.load(stream, &got).map_err(at)?;
            }
            Op::Delete(stream) => {
                store
                    .delete(stream)
                    .await
                    .map_err(|e| at(format!("delete failed: {e:?}")))?;
                model.kept.remove(stream);
            }
            Op::Reopen => store = harness.reopen(store).await,
        }
    }
    verify_all(&store, &mut model)
        .await
        .map_err(|e| format!("after the last op: {e}"))?;
    let store = harness.reopen(store).await;
    verify_all(&store, &mut model)
        .await
        .map_err(|e| format!("after the final reopen: {e}"))
}

async fn verify_all<S: SnapshotStore + ?Sized>(store: &S, model: &mut Model) -> Result<(), String> {
    for name in STREAMS {
        let stream = StreamId::new(name).expect("valid pool name");
        let got = store
            .load(&stream)
            .await
            .map_err(|e| format!("load({stream}) failed: {e:?}"))?;
        model.load(&stream, &got)?;
    }
    Ok(())
}

async fn check_racing_saves<H: SnapshotHarness>(
    harness: &mut H,
    config: &SuiteConfig,
) -> Result<(), String> {
    let store = Arc::new(harness.create().await);
    let unknown = StreamId::new("never-saved").expect("valid name");
    let none = store.load(&unknown).await.map_err(|e| format!("{e:?}"))?;
    ensure!(
        none.is_none(),
        "load of a never-saved stream returned {none:?}"
    );
    store
        .delete(&unknown)
        .await
        .map_err(|e| format!("delete of a never-saved stream failed: {e:?}"))?;

    let tasks = config.concurrency.max(2);
    let total = (tasks * config.concurrent_ops.max(1)) as u64;
    let stream = StreamId::new("raced-snapshot").expect("valid name");
    let state = |v: u64| Bytes::from(format!("state at {v}"));
    let start = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut handles = Vec::new();
    for t in 0..tasks as u64 {
        let (store, stream, start) = (store.clone(), stream.clone(), start.clone());
        handles.push(tokio::spawn(async move {
            start.wait().await;
            // Even tasks save upwards, odd ones downwards: racing writers.
            let mut mine: Vec<u64> = (1..=total).filter(|v| v % tasks as u64 == t).collect();
            if t % 2 == 1 {
                mine.reverse();
            }
            for v in mine {
                let snapshot = Snapshot {
                    stream: stream.clone(),
                    version: v,
                    schema: 1,
                    state: state(v),
                };
                store.save(snapshot).await?;
                tokio::task::yield_now().await;
            }
            Ok::<(), SnapshotError>(())
        }));
    }
    for (i, h) in handles.into_iter().enumerate() {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("task {i}: save failed: {e:?}")),
            Err(e) => return Err(format!("task {i} panicked: {e}")),
        }
    }
    let want = Snapshot {
        stream: stream.clone(),
        version: total,
        schema: 1,
        state: state(total),
    };
    let got = store.load(&stream).await.map_err(|e| format!("{e:?}"))?;
    ensure!(
        got.as_ref() == Some(&want),
        "after racing saves of versions 1..={total}, load returned {got:?}; expected version {total}"
    );
    Ok(())
}

async fn check_large_state<H: SnapshotHarness>(harness: &mut H) -> Result<(), String> {
    let store = harness.create().await;
    let stream = StreamId::new("large-snapshot").expect("valid name");
    let big = Snapshot {
        stream: stream.clone(),
        version: 3,
        schema: 2,
        state: Bytes::from(
            (0..256 * 1024u32)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<_>>(),
        ),
    };
    match store.save(big.clone()).await {
        // A store may refuse it, if it says so with its typed error.
        Err(SnapshotError::TooLarge { .. }) => {
            let got = store.load(&stream).await.map_err(|e| format!("{e:?}"))?;
            ensure!(got.is_none(), "a refused save left {got:?}");
            Ok(())
        }
        Err(e) => Err(format!("saving a 256 KiB state failed: {e:?}")),
        Ok(()) => {
            let store = harness.reopen(store).await;
            let got = store.load(&stream).await.map_err(|e| format!("{e:?}"))?;
            ensure!(
                got.as_ref() == Some(&big),
                "a 256 KiB state did not round-trip (got {:?})",
                got.map(|s| (s.version, s.schema, s.state.len()))
            );
            Ok(())
        }
    }
}
