//! The `smartmsg` command: simulate, seeds, inspect, and clear errors.

use std::process::{Command, Output};

fn smartmsg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_smartmsg"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else if e.file_name() != "LOCK" {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn find(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()? {
        let p = e.ok()?.path();
        if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
        if p.is_dir() {
            if let Some(f) = find(&p, name) {
                return Some(f);
            }
        }
    }
    None
}

#[test]
fn bad_arguments_get_clear_errors() {
    let o = smartmsg(&["simulate", "--policy", "greedy"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("unknown policy \"greedy\""),
        "{}",
        text(&o)
    );
    let o = smartmsg(&["simulate", "--seeds", "0"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--seeds"), "{}", text(&o));
    let o = smartmsg(&["simulate", "--scenario", "nope.toml"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no such file"), "{}", text(&o));
    let o = smartmsg(&["simulate", "--seeds", "2", "--population", "x.csv"]);
    assert!(text(&o).contains("cannot be combined"), "{}", text(&o));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[campaign]\nbudget = 0\n").unwrap();
    let o = smartmsg(&["simulate", "--scenario", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("`campaign.budget`"), "{}", text(&o));
    let o = smartmsg(&["inspect", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("holds no event log"), "{}", text(&o));
}

#[test]
fn simulate_writes_a_report_and_inspect_shows_the_stores() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let report = dir.path().join("report");
    let csv = dir.path().join("pop.csv");
    let o = smartmsg(&[
        "simulate",
        "--scenario",
        "small",
        "--policy",
        "integrated",
        "--data-dir",
        data.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--export-population",
        csv.to_str().unwrap(),
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("integrated") && out.contains("invariants: all hold"),
        "{out}"
    );
    assert!(report.join("report.json").exists() && report.join("chart.svg").exists());
    let svg = std::fs::read_to_string(report.join("chart.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("integrated"));
    let o = smartmsg(&["inspect", data.to_str().unwrap()]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for want in [
        "stream campaign-small: version",
        "stream pipeline-small",
        "completed, 6 batches planned (6 sent), 1200 messages sent",
        "delay queue: 0 pending jobs",
        "reaction dead letters: 0",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    // Damaged redb files: a non-zero exit with a message naming the file,
    // never a panic.
    for file in ["snapshots.redb", "queue.redb"] {
        let copy = dir.path().join(format!("damaged-{file}"));
        copy_dir(&data, &copy);
        let target = find(&copy, file).unwrap_or_else(|| panic!("no {file} under {copy:?}"));
        let mut bytes = std::fs::read(&target).unwrap();
        for b in bytes.iter_mut().skip(512) {
            *b ^= 0x5a;
        }
        std::fs::write(&target, bytes).unwrap();
        let o = smartmsg(&["inspect", copy.to_str().unwrap()]);
        let out = text(&o);
        assert!(
            !o.status.success(),
            "damaged {file} inspected without error: {out}"
        );
        assert!(out.contains(file), "the error does not name {file}: {out}");
        assert!(!out.contains("panicked"), "{out}");
    }
    // The same population, read back from the CSV, gives the same run.
    let report2 = dir.path().join("report2");
    let o = smartmsg(&[
        "simulate",
        "--scenario",
        "small",
        "--policy",
        "integrated",
        "--population",
        csv.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--report",
        report2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let a: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    let b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report2.join("report.json")).unwrap()).unwrap();
    assert_eq!(a["policies"], b["policies"]);
    // A data directory that is not the simulator's is refused.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("precious.txt"), "keep").unwrap();
    let o = smartmsg(&[
        "simulate",
        "--scenario",
        "small",
        "--data-dir",
        other.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("was not made by `smartmsg simulate`"),
        "{}",
        text(&o)
    );
    assert!(other.join("precious.txt").exists());
}

#[test]
fn seeds_mode_reports_every_seed() {
    let o = smartmsg(&["simulate", "--seeds", "4", "--seed", "10"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(
            "4 seeds (10..=13) on scenario small with random faults: 0 broke an invariant"
        ),
        "{out}"
    );
}
