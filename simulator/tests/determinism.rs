//! Same seed and scenario ⇒ byte-identical event log and report.

use std::path::Path;
use std::sync::Arc;

use smartmsg_simulator::{compare, CompareOptions, PolicyName, QueueKind, Scenario, SimPopulation};

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "LOCK")
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn run(s: &Scenario, dir: &Path) -> Vec<u8> {
    let pop = Arc::new(SimPopulation::generate(s).unwrap());
    let report = compare(s, &pop, &{
        let mut o = CompareOptions::new(PolicyName::ALL.to_vec(), dir);
        o.queue = QueueKind::Embedded;
        o.threads = 2;
        o
    })
    .unwrap();
    assert!(report.violations().is_empty(), "{}", report.table(false));
    report.to_json()
}

#[test]
fn same_seed_gives_byte_identical_logs_and_reports() {
    let mut s = Scenario::small();
    // Faults too: a crash, a repeated job, repeats, reordering, garbage.
    s.faults = Scenario::from_toml(
        r#"
[faults]
crashes = [{ at = "after-plan-before-send", batch = 2 }, { at = "mid-reactions", message = 40 }]
duplicate_jobs = [1]
duplicate_reactions = 0.05
reorder_within_grace = 0.05
reorder_beyond_grace = 0.02
malformed_reactions = 12
"#,
        "faults",
    )
    .unwrap()
    .faults;
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let ra = run(&s, a.path());
    let rb = run(&s, b.path());
    assert_eq!(ra, rb, "reports differ");
    for p in PolicyName::ALL {
        let fa = files(&a.path().join(p.as_str()).join("log"));
        let fb = files(&b.path().join(p.as_str()).join("log"));
        assert!(!fa.is_empty());
        assert_eq!(fa.len(), fb.len());
        for ((na, da), (nb, db)) in fa.iter().zip(&fb) {
            assert_eq!(na, nb);
            assert!(da == db, "{p}: segment {na} differs");
        }
    }
    // Another seed gives another run.
    let mut t = s;
    t.seed += 1;
    let c = tempfile::tempdir().unwrap();
    assert_ne!(run(&t, c.path()), ra);
}
