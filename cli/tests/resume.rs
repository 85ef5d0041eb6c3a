//! `smartmsg simulate --data-dir DIR --resume`: a simulation killed
//! (SIGKILL) at random moments and resumed, again and again, ends with the
//! same decisions and responses as one that ran straight through, and every
//! invariant holding.

use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};

fn smartmsg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smartmsg"))
}

fn report(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
}

#[test]
fn a_killed_simulation_resumes_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    // The classic campaign (300,000 subscribers): long enough to kill.
    let args = ["simulate", "--policy", "random", "--threads", "1"];
    let straight = tmp.path().join("straight");
    let o = smartmsg()
        .args(args)
        .args(["--data-dir", tmp.path().join("d1").to_str().unwrap()])
        .args(["--report", straight.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let data = tmp.path().join("d2");
    let resumed = tmp.path().join("resumed");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut kills = 0;
    for i in 0..6 {
        let mut child = smartmsg()
            .args(args)
            .args(["--data-dir", data.to_str().unwrap()])
            .args(["--report", resumed.to_str().unwrap()])
            .args(if i == 0 { &[][..] } else { &["--resume"][..] })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(100..900)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    let o = smartmsg()
        .args(args)
        .args(["--data-dir", data.to_str().unwrap()])
        .args(["--report", resumed.to_str().unwrap(), "--resume"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("invariants: all hold"), "{out}");
    assert!(kills >= 3, "only {kills} kills landed");
    let (a, b) = (report(&straight), report(&resumed));
    let pa = &a["policies"][0];
    let pb = &b["policies"][0];
    assert_eq!(pa["batches"], pb["batches"], "the same batches");
    assert_eq!(pa["responses_realised"], pb["responses_realised"]);
    assert_eq!(pa["messages_sent"], pb["messages_sent"]);
}
