//! The `platform` scenario at a small size: several campaigns over one
//! audience on one runtime, each run to its budget; the audience stored
//! once; the same seed gives the same figures.

use std::sync::Arc;

use smartmsg_embedded::EmbeddedLog;
use smartmsg_engine::EventLog;
use smartmsg_service::streams::CampaignStreams;
use smartmsg_simulator::platform::{run_platform, PlatformSpec};
use smartmsg_simulator::SimError;

fn spec() -> PlatformSpec {
    let mut s = PlatformSpec::new(20_000, 3);
    s.batches = 4;
    s.propensity_draws = 20;
    s
}

fn chunks(dir: &std::path::Path, campaign: &str) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.join("log")).unwrap());
        let s = CampaignStreams::new(campaign).unwrap().audience;
        log.read_stream(&s, 1, 10_000).await.unwrap().len()
    })
}

#[test]
fn a_platform_runs_its_campaigns_over_one_stored_audience() {
    let root = tempfile::tempdir().unwrap();
    let spec = spec();
    let a = root.path().join("a");
    let r = run_platform(&spec, &a, None).unwrap();
    assert_eq!(r.campaigns.len(), 3);
    for c in &r.campaigns {
        assert_eq!(c.sent, spec.budget, "{}", c.name);
        assert!(c.reactions > 0, "{}", c.name);
        assert!(c.oracle_expected > c.random_expected, "{}", c.name);
        // Learning pays on every campaign (measured 0.80 to 0.86 at this
        // size; random is 0).
        assert!(c.lift > 0.5, "{}: lift {}", c.name, c.lift);
    }
    let names: Vec<&str> = r.campaigns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["platform-00", "platform-01", "platform-02"]);
    // The campaigns' truths differ: so do their references.
    assert_ne!(
        r.campaigns[0].oracle_expected,
        r.campaigns[1].oracle_expected
    );
    if cfg!(target_os = "linux") {
        assert!(r.peak_rss_bytes.is_some_and(|b| b > 0));
    }
    assert!(r.log_events > 0 && r.data_bytes > 0);

    // The audience is stored by the first campaign only.
    assert!(chunks(&a, "platform-00") > 0);
    assert_eq!(chunks(&a, "platform-01"), 0);
    assert_eq!(chunks(&a, "platform-02"), 0);

    // The same seed, the same figures.
    let again = run_platform(&spec, &root.path().join("b"), None).unwrap();
    assert_eq!(again.campaigns, r.campaigns);
    assert_eq!(again.log_events, r.log_events);

    // A directory that holds a run is refused, not overwritten.
    assert!(matches!(
        run_platform(&spec, &a, None),
        Err(SimError::DataDir { .. })
    ));
}

#[test]
fn a_platform_refuses_what_it_cannot_run() {
    let root = tempfile::tempdir().unwrap();
    let mut s = spec();
    s.campaigns = 0;
    assert!(run_platform(&s, root.path(), None).is_err());
    let mut s = spec();
    s.campaigns = PlatformSpec::MAX_CAMPAIGNS + 1;
    assert!(run_platform(&s, root.path(), None).is_err());
    let mut s = spec();
    s.budget = u64::from(s.users) + 1;
    assert!(run_platform(&s, root.path(), None).is_err());
}
