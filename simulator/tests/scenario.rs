//! Scenario files: TOML and JSON, defaults, and errors that name the field.

use smartmsg_simulator::scenario::{DelaySpec, TruthSpec};
use smartmsg_simulator::{Crash, Scenario, ScenarioError};

#[test]
fn the_default_is_the_classic_case() {
    let s = Scenario::default();
    assert_eq!(s.population.subscribers, 300_000);
    assert_eq!(s.campaign.budget, 100_000);
    assert_eq!(s.campaign.creatives, 4);
    assert_eq!(s.campaign.batches, 10);
    assert_eq!(s.seed, 42);
    s.validate().unwrap();
    Scenario::small().validate().unwrap();
}

#[test]
fn a_toml_file_names_only_what_it_changes() {
    let s = Scenario::from_toml(
        r#"
name = "mine"
seed = 7

[campaign]
budget = 5000
batches = 5

[truth]
kind = "generated"
base_rate = 0.05

[reactions]
delay = { kind = "exponential", mean_ms = 600000 }

[faults]
crashes = [{ at = "before-plan", batch = 2 }, { at = "mid-reactions", message = 10 }]
duplicate_jobs = [1]
malformed_reactions = 3
"#,
        "test",
    )
    .unwrap();
    assert_eq!(s.name, "mine");
    assert_eq!(s.seed, 7);
    assert_eq!(s.campaign.budget, 5000);
    assert_eq!(s.campaign.creatives, 4, "default kept");
    assert_eq!(s.population.subscribers, 300_000, "default kept");
    assert!(
        matches!(s.truth, TruthSpec::Generated { base_rate, shared_scale, .. }
        if base_rate == 0.05 && shared_scale > 0.0)
    );
    assert_eq!(
        s.reactions.delay,
        DelaySpec::Exponential { mean_ms: 600_000 }
    );
    assert_eq!(
        s.faults.crashes,
        vec![
            Crash::BeforePlan { batch: 2 },
            Crash::MidReactions { message: 10 }
        ]
    );
}

#[test]
fn json_files_load_too() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.json");
    std::fs::write(
        &p,
        r#"{"name":"j","campaign":{"budget":1000,"batches":4},"population":{"subscribers":5000}}"#,
    )
    .unwrap();
    let s = Scenario::load(&p).unwrap();
    assert_eq!((s.campaign.budget, s.population.subscribers), (1000, 5000));
    let t = dir.path().join("s.toml");
    std::fs::write(&t, s.to_toml()).unwrap();
    assert_eq!(Scenario::load(&t).unwrap(), s);
}

fn field_of(e: ScenarioError) -> (String, String) {
    match e {
        ScenarioError::Invalid { field, reason } => (field, reason),
        other => panic!("expected an invalid field, got {other}"),
    }
}

#[test]
fn invalid_values_name_the_field_and_why() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[campaign]\nbudget = 400000",
            "campaign.budget",
            "population.subscribers",
        ),
        (
            "[population]\nsubscribers = 2000000\n[campaign]\nbudget = 1100000\nbatches = 2",
            "campaign.batches",
            "at most 500000 per batch",
        ),
        ("[campaign]\ncreatives = 0", "campaign.creatives", "1 to 64"),
        (
            "[population]\nfeatures = 65",
            "population.features",
            "1 to 64",
        ),
        (
            "[population]\nnon_reacting_share = 1.5",
            "population.non_reacting_share",
            "[0, 1)",
        ),
        (
            "[truth]\nkind = \"generated\"\nbase_rate = 0",
            "truth.base_rate",
            "between 0 and 1",
        ),
        (
            "[truth]\nkind = \"explicit\"\nintercepts = [-3, -3]\nweights = [[0.1], [0.2]]",
            "truth.intercepts",
            "campaign.creatives is 4",
        ),
        (
            "[reactions]\nmax_jitter_ms = 500000",
            "reactions.max_jitter_ms",
            "grace",
        ),
        (
            "[policies]\ntargeting_creative = 9",
            "policies.targeting_creative",
            "below 4",
        ),
        (
            "[faults]\nduplicate_jobs = [10]",
            "faults.duplicate_jobs[0]",
            "below campaign.batches",
        ),
        (
            "[faults]\ncrashes = [{ at = \"after-plan-before-send\", batch = 12 }]",
            "faults.crashes[0].batch",
            "below campaign.batches",
        ),
        ("name = \"Has Spaces\"", "name", "a-z"),
    ];
    for (text, field, why) in cases {
        let (f, reason) = field_of(Scenario::from_toml(text, "t").unwrap_err());
        assert_eq!(&f, field, "{text}");
        assert!(reason.contains(why), "{text}: {reason}");
    }
}

#[test]
fn syntax_and_type_errors_say_where() {
    let e = Scenario::from_toml("[campaign]\nbudget = \"lots\"", "s.toml").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("s.toml") && msg.contains("line 2"), "{msg}");
    assert!(msg.contains("budget") || msg.contains("u64"), "{msg}");
    let e = Scenario::from_toml("[campaign]\nbugdet = 3", "s.toml").unwrap_err();
    assert!(e.to_string().contains("unknown field `bugdet`"), "{e}");
    let e = Scenario::from_json("{\"campaign\": {\"budget\": -1}}", "s.json").unwrap_err();
    assert!(e.to_string().contains("line 1"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.yaml");
    std::fs::write(&p, "x").unwrap();
    assert!(matches!(
        Scenario::load(&p),
        Err(ScenarioError::Format { .. })
    ));
    assert!(matches!(
        Scenario::load(&dir.path().join("missing.toml")),
        Err(ScenarioError::Read { .. })
    ));
}

#[test]
fn the_shipped_scenario_files_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    assert_eq!(
        Scenario::load(&dir.join("classic.toml")).unwrap(),
        Scenario::classic()
    );
    let f = Scenario::load(&dir.join("small-faults.toml")).unwrap();
    assert_eq!(f.faults.crashes.len(), 7);
    assert_eq!(f.campaign.budget, Scenario::small().campaign.budget);
}
