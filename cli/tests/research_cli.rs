//! The researcher's commands end to end: simulate, export, import, replay,
//! evaluate (and their refusals).

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

#[test]
fn simulate_export_import_replay_evaluate() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_owned();
    for policy in ["random", "integrated"] {
        let o = smartmsg(&[
            "simulate",
            "--scenario",
            "small",
            "--policy",
            policy,
            "--data-dir",
            &p(&format!("sim-{policy}")),
            "--report",
            &p("report"),
        ]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let o = smartmsg(&["export", &p("sim-random"), "--out", &p("random.jsonl")]);
    assert!(o.status.success(), "{}", text(&o));
    let o = smartmsg(&["import", &p("random.jsonl"), "--data-dir", &p("copy")]);
    assert!(o.status.success(), "{}", text(&o));
    let o = smartmsg(&["import", &p("random.jsonl"), "--data-dir", &p("copy")]);
    assert!(!o.status.success());
    assert!(text(&o).contains("not empty"), "{}", text(&o));
    for src in [p("random.jsonl"), p("copy"), p("sim-random")] {
        let o = smartmsg(&["replay", &src]);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        assert!(
            out.contains("checks: all hold") && out.contains("events/s"),
            "{out}"
        );
    }
    let o = smartmsg(&[
        "evaluate",
        "--logged",
        &p("random.jsonl"),
        "--scenario",
        "small",
        "--policy",
        "all",
        "--bootstrap",
        "50",
        "--draws",
        "4",
        "--out",
        &p("eval.json"),
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("target integrated (true value on the logged users"),
        "{out}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p("eval.json")).unwrap()).unwrap();
    assert_eq!(json["targets"].as_array().unwrap().len(), 6);
    // The seeded run is deterministic: DR's interval covers each target's
    // true value on the logged users.
    for t in json["targets"].as_array().unwrap() {
        let truth = t["true_value"].as_f64().unwrap();
        let dr = t["estimates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["estimator"] == "DR")
            .unwrap();
        let (lo, hi) = (
            dr["ci_low"].as_f64().unwrap(),
            dr["ci_high"].as_f64().unwrap(),
        );
        assert!(lo <= truth && truth <= hi, "{t}");
    }
    // Whole policies, batch by batch: the user-selecting targets are
    // estimated well above the logging policy's rate.
    let o = smartmsg(&[
        "evaluate",
        "--logged",
        &p("random.jsonl"),
        "--scenario",
        "small",
        "--policy",
        "random,integrated",
        "--slate",
        "--bootstrap",
        "50",
        "--draws",
        "50",
        "--out",
        &p("slate.json"),
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("true value of its own batches"), "{out}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p("slate.json")).unwrap()).unwrap();
    let sndr = |t: &serde_json::Value| {
        t["estimates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["estimator"] == "SNDR")
            .unwrap()["value"]
            .as_f64()
            .unwrap()
    };
    let targets = json["targets"].as_array().unwrap();
    assert_eq!(targets[1]["level"], "batch");
    assert!(sndr(&targets[1]) > 1.5 * sndr(&targets[0]), "{json}");
    // A log of a policy that does not pick users uniformly is refused.
    let o = smartmsg(&[
        "evaluate",
        "--logged",
        &p("sim-integrated"),
        "--scenario",
        "small",
        "--policy",
        "random",
        "--out",
        &p("eval2.json"),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("does not pick users uniformly"),
        "{}",
        text(&o)
    );
}

#[test]
fn evaluate_reports_bad_csv_rows_and_refuses_unsupported_targets() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_owned();
    std::fs::write(
        p("bad.csv"),
        "ts,x,act,r,prop\n1,0.5,a,1,0.5\n2,0.1,b,x,0.5\n3,0.2,a,0,0\n",
    )
    .unwrap();
    std::fs::write(p("t.csv"), "a,b\n1,0\n1,0\n1,0\n").unwrap();
    let o = smartmsg(&[
        "evaluate",
        "--logged",
        &p("bad.csv"),
        "--target-probs",
        &p("t.csv"),
        "--feature-cols",
        "x",
        "--action-col",
        "act",
        "--reward-col",
        "r",
        "--propensity-col",
        "prop",
        "--out",
        &p("e.json"),
    ]);
    let out = text(&o);
    assert!(!o.status.success());
    assert!(out.contains("line 3: non-numeric reward `x`"), "{out}");
    assert!(out.contains("line 4: non-positive propensity 0"), "{out}");
    // Good rows, but only action a is logged and the target wants b.
    let mut csv = String::from("ts,x,act,r,prop\n");
    let mut t = String::from("a,b\n");
    for i in 0..30 {
        csv.push_str(&format!("{i},{},a,{},0.5\n", i as f64 / 30.0, i % 2));
        t.push_str("0.5,0.5\n");
    }
    std::fs::write(p("ok.csv"), csv).unwrap();
    std::fs::write(p("t2.csv"), t).unwrap();
    let o = smartmsg(&[
        "evaluate",
        "--logged",
        &p("ok.csv"),
        "--target-probs",
        &p("t2.csv"),
        "--feature-cols",
        "x",
        "--action-col",
        "act",
        "--reward-col",
        "r",
        "--propensity-col",
        "prop",
        "--actions",
        "a,b",
        "--out",
        &p("e.json"),
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains(
            "refusing to estimate: the target policy puts mass on actions never logged: b"
        ),
        "{out}"
    );
    // Both actions logged: estimates for every estimator, JSON written.
    let mut csv = String::from("ts,x,seg,act,r,prop\n");
    for i in 0..40 {
        let act = if i % 2 == 0 { "a" } else { "b" };
        let seg = if i % 3 == 0 { "north" } else { "south" };
        csv.push_str(&format!(
            "{i},{},{seg},{act},{},0.5\n",
            i as f64 / 40.0,
            i % 3 % 2
        ));
    }
    let t: String = std::iter::once("a,b\n".to_owned())
        .chain((0..40).map(|_| "0.25,0.75\n".to_owned()))
        .collect();
    std::fs::write(p("ok2.csv"), csv).unwrap();
    std::fs::write(p("t3.csv"), t).unwrap();
    let o = smartmsg(&[
        "evaluate",
        "--logged",
        &p("ok2.csv"),
        "--target-probs",
        &p("t3.csv"),
        "--feature-cols",
        "x,seg",
        "--timestamp-col",
        "ts",
        "--action-col",
        "act",
        "--reward-col",
        "r",
        "--propensity-col",
        "prop",
        "--out",
        &p("e3.json"),
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("logged: 40 rows, 2 actions, 3 features"),
        "{out}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p("e3.json")).unwrap()).unwrap();
    assert_eq!(json["targets"][0]["estimates"].as_array().unwrap().len(), 6);
}
