//! The campaign read model on the test script's PostgreSQL: rows follow
//! the log, a second projector under the same name takes over from the
//! stored checkpoint, the first one (a zombie) then commits nothing, and a
//! projector started mid-stream folds the campaign's earlier events from
//! the log.
//!
//! Needs `SMARTMSG_POSTGRES_URL` (the test script starts PostgreSQL); skips
//! with a printed reason otherwise.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use smartmsg_domain::{
    BatchSchedule, BatchSizing, CampaignEvent, CampaignSpec, CommandStamp, Status,
};
use smartmsg_engine::memory::InMemoryLog;
use smartmsg_engine::{
    AppendTx, EventCodec, EventLog, ExpectedVersion, NewEvent, Projection, ProjectionError,
    ProjectionRunner,
};
use smartmsg_postgres::{PgCampaignReader, PgCampaigns};
use smartmsg_service::streams::CampaignStreams;

fn url() -> Option<String> {
    match std::env::var("SMARTMSG_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("skipping: SMARTMSG_POSTGRES_URL not set (scripts/test starts PostgreSQL)");
            None
        }
    }
}

fn stamp(id: &str) -> CommandStamp {
    CommandStamp {
        id: id.into(),
        fingerprint: 1,
    }
}

async fn append(log: &dyn EventLog, ev: CampaignEvent) {
    let stream = CampaignStreams::new("c1").unwrap().campaign;
    let e = NewEvent::new(ev.kind(), ev.schema(), 1, ev.encode().to_vec());
    log.append(AppendTx::single(stream, ExpectedVersion::Any, vec![e]))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_follow_the_log_and_a_zombie_projector_commits_nothing() {
    let Some(url) = url() else {
        return;
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let schema = format!("t_{}_{nanos}", std::process::id());
    let log: Arc<dyn EventLog> = Arc::new(InMemoryLog::new());
    let spec = CampaignSpec {
        channel: "pg".into(),
        audience: "a".into(),
        creatives: vec!["x".into(), "y".into()],
        budget: 500,
        schedule: BatchSchedule {
            start_ms: 1,
            interval_ms: 1_000,
            sizing: BatchSizing::Count(2),
        },
    };
    append(
        &*log,
        CampaignEvent::Created {
            command: stamp("create"),
            spec,
        },
    )
    .await;
    append(
        &*log,
        CampaignEvent::Scheduled {
            command: stamp("schedule"),
        },
    )
    .await;
    append(
        &*log,
        CampaignEvent::Started {
            command: stamp("start"),
        },
    )
    .await;
    // Not a campaign stream: ignored, but the checkpoint moves past it.
    log.append(AppendTx::single(
        smartmsg_engine::StreamId::new("pipeline-c1").unwrap(),
        ExpectedVersion::Any,
        vec![NewEvent::new("Tick", 1, 1, b"{}".to_vec())],
    ))
    .await
    .unwrap();

    let reader = PgCampaignReader::connect(&url, &schema).await.unwrap();
    let first = PgCampaigns::connect(&url, &schema, "shard-0", Arc::clone(&log))
        .await
        .unwrap();
    let mut a = ProjectionRunner::new(Arc::clone(&log), first);
    a.catch_up().await.unwrap();
    let row = reader.get("c1").await.unwrap().expect("a row");
    assert_eq!(row.status, Some(Status::Running));
    assert_eq!(
        (row.version, row.budget, row.budget_left, row.sent),
        (3, 500, 500, 0)
    );
    assert_eq!(a.projection().checkpoint().await.unwrap(), 4);

    // The shard moves: a second projector continues from the stored
    // checkpoint, starting mid-stream (it folds events 1..3 from the log).
    append(
        &*log,
        CampaignEvent::Paused {
            command: stamp("pause"),
        },
    )
    .await;
    let second = PgCampaigns::connect(&url, &schema, "shard-0", Arc::clone(&log))
        .await
        .unwrap();
    let mut b = ProjectionRunner::new(Arc::clone(&log), second);
    let caught = b.catch_up().await.unwrap();
    assert_eq!(caught.events, 1, "only the new event: {caught:?}");
    let row = reader.get("c1").await.unwrap().unwrap();
    assert_eq!((row.status, row.version), (Some(Status::Paused), 4));

    // The first projector wakes up behind the stored checkpoint: it must
    // commit nothing.
    append(
        &*log,
        CampaignEvent::Resumed {
            command: stamp("resume"),
        },
    )
    .await;
    let zombie = a.catch_up().await;
    assert!(
        matches!(zombie, Err(ProjectionError::Rejected { .. })),
        "{zombie:?}"
    );
    let row = reader.get("c1").await.unwrap().unwrap();
    assert_eq!(row.status, Some(Status::Paused), "nothing of the zombie's");
    b.catch_up().await.unwrap();
    let row = reader.get("c1").await.unwrap().unwrap();
    assert_eq!((row.status, row.version), (Some(Status::Running), 5));
    assert_eq!(reader.list().await.unwrap(), vec![row]);
}

#[tokio::test]
async fn bad_schema_names_are_refused() {
    for bad in ["", "Upper", "1x", "a-b", "a;drop", &"x".repeat(49)] {
        let r = PgCampaignReader::connect("postgres://127.0.0.1:1/none", bad).await;
        assert!(
            matches!(r, Err(smartmsg_postgres::PgError::Schema(_))),
            "{bad:?}"
        );
    }
}
